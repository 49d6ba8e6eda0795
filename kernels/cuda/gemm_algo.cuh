// cuBLASLt algorithm configurations for CudaGemm (kernels/cuda/gemm.cu): reading a configuration
// out of an algorithm, building an algorithm from a recorded configuration, and the tile / cluster
// variants a benchmark sweeps. Host code only.
#pragma once

#include <cublasLt.h>

#include <string>
#include <vector>

#include "kernels/cuda/gemm_cuda.h"

namespace phishard::gemm_algo {

// The CUBLASLT_ALGO_CONFIG_* values of `algo`.
GemmAlgoConfig ReadConfig(const cublasLtMatmulAlgo_t& algo);

// Initialises *algo for the given types (compute float32, scale float32) with every
// CUBLASLT_ALGO_CONFIG_* value of c, then asks cuBLASLt whether it runs for these descriptors
// (cublasLtMatmulAlgoCheck). CUBLAS_STATUS_SUCCESS and *workspace set when it does.
cublasStatus_t Build(cublasLtHandle_t handle, cudaDataType_t ab_type, cudaDataType_t cd_type,
                     const GemmAlgoConfig& c, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                     cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t d, cublasLtMatmulAlgo_t* algo,
                     size_t* workspace);

// Tile ids (CUBLASLT_MATMUL_TILE_*) and cluster ids (CUBLASLT_CLUSTER_SHAPE_*) that
// CudaGemm::ListAlgos tries on the first pick's algorithm.
const std::vector<int>& VariantTiles();
const std::vector<int>& VariantClusters();

// "algo A tile T stages S split-K K scheme R swizzle W custom C cluster U inner I".
std::string Describe(const GemmAlgoConfig& c);

}  // namespace phishard::gemm_algo
