#include <cstdint>
#include <cstdio>

#include "kernels/cuda/gemm_algo.cuh"

namespace phishard::gemm_algo {

GemmAlgoConfig ReadConfig(const cublasLtMatmulAlgo_t& algo) {
  auto get = [&](cublasLtMatmulAlgoConfigAttributes_t attr, auto* v) {
    size_t written = 0;
    cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, v, sizeof(*v), &written);
  };
  int32_t algo_id = 0, split_k = 0;
  uint32_t tile = 0, stages = 0, reduction = 0, swizzle = 0, custom = 0;
  uint16_t cluster = 0, inner = 0;
  get(CUBLASLT_ALGO_CONFIG_ID, &algo_id);
  get(CUBLASLT_ALGO_CONFIG_TILE_ID, &tile);
  get(CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages);
  get(CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split_k);
  get(CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &reduction);
  get(CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swizzle);
  get(CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &custom);
  get(CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster);
  get(CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID, &inner);
  GemmAlgoConfig c;
  c.algo_id = algo_id;
  c.tile_id = static_cast<int>(tile);
  c.stages_id = static_cast<int>(stages);
  c.split_k = split_k;
  c.reduction = static_cast<int>(reduction);
  c.swizzle = static_cast<int>(swizzle);
  c.custom = static_cast<int>(custom);
  c.cluster_id = static_cast<int>(cluster);
  c.inner_shape_id = static_cast<int>(inner);
  return c;
}

cublasStatus_t Build(cublasLtHandle_t handle, cudaDataType_t ab_type, cudaDataType_t cd_type,
                     const GemmAlgoConfig& c, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                     cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t d, cublasLtMatmulAlgo_t* algo,
                     size_t* workspace) {
  cublasStatus_t st = cublasLtMatmulAlgoInit(handle, CUBLAS_COMPUTE_32F, CUDA_R_32F, ab_type,
                                             ab_type, cd_type, cd_type, c.algo_id, algo);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  const uint32_t tile = c.tile_id, stages = c.stages_id, reduction = c.reduction,
                 swizzle = c.swizzle, custom = c.custom;
  const int32_t split_k = c.split_k;
  const uint16_t cluster = static_cast<uint16_t>(c.cluster_id),
                 inner = static_cast<uint16_t>(c.inner_shape_id);
  auto set = [&](cublasLtMatmulAlgoConfigAttributes_t attr, const auto& v) {
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulAlgoConfigSetAttribute(algo, attr, &v, sizeof(v));
  };
  set(CUBLASLT_ALGO_CONFIG_TILE_ID, tile);
  set(CUBLASLT_ALGO_CONFIG_STAGES_ID, stages);
  set(CUBLASLT_ALGO_CONFIG_SPLITK_NUM, split_k);
  set(CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, reduction);
  set(CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, swizzle);
  set(CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, custom);
  set(CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, cluster);
  set(CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID, inner);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  cublasLtMatmulHeuristicResult_t result = {};
  st = cublasLtMatmulAlgoCheck(handle, desc, a, b, d, d, algo, &result);
  if (st == CUBLAS_STATUS_SUCCESS && result.state != CUBLAS_STATUS_SUCCESS) st = result.state;
  if (st == CUBLAS_STATUS_SUCCESS) *workspace = result.workspaceSize;
  return st;
}

const std::vector<int>& VariantTiles() {
  static const std::vector<int> tiles = {CUBLASLT_MATMUL_TILE_128x128, CUBLASLT_MATMUL_TILE_128x256,
                                         CUBLASLT_MATMUL_TILE_256x128, CUBLASLT_MATMUL_TILE_64x256,
                                         CUBLASLT_MATMUL_TILE_256x64,  CUBLASLT_MATMUL_TILE_128x192,
                                         CUBLASLT_MATMUL_TILE_192x128};
  return tiles;
}

const std::vector<int>& VariantClusters() {
  static const std::vector<int> clusters = {
      CUBLASLT_CLUSTER_SHAPE_1x1x1, CUBLASLT_CLUSTER_SHAPE_2x1x1, CUBLASLT_CLUSTER_SHAPE_1x2x1,
      CUBLASLT_CLUSTER_SHAPE_2x2x1};
  return clusters;
}

std::string Describe(const GemmAlgoConfig& c) {
  char buf[160];
  std::snprintf(buf, sizeof(buf),
                "algo %d tile %d stages %d split-K %d scheme %d swizzle %d custom %d cluster %d "
                "inner %d",
                c.algo_id, c.tile_id, c.stages_id, c.split_k, c.reduction, c.swizzle, c.custom,
                c.cluster_id, c.inner_shape_id);
  return buf;
}

}  // namespace phishard::gemm_algo
