#include "kernels/sgmv.h"

#include <cblas.h>

#include <algorithm>
#include <vector>

namespace phishard {
namespace {

// Checks the segment table shared by shrink and expand: starts non-decreasing inside
// [0, num_rows], ranks in [0, ldt].
KernelStatus CheckSegments(const int32_t* seg_starts, const int32_t* ranks, int num_segments,
                           int num_rows, int ldt) {
  if (num_segments < 0 || num_rows < 0) return KernelStatus::kInvalidShape;
  if (num_segments == 0) return KernelStatus::kOk;
  if (seg_starts == nullptr || ranks == nullptr) return KernelStatus::kNullPointer;
  if (seg_starts[0] < 0) return KernelStatus::kInvalidShape;
  for (int s = 0; s < num_segments; ++s) {
    if (seg_starts[s + 1] < seg_starts[s] || seg_starts[s + 1] > num_rows) {
      return KernelStatus::kInvalidShape;
    }
    if (ranks[s] < 0 || ranks[s] > ldt) return KernelStatus::kInvalidShape;
  }
  return KernelStatus::kOk;
}

}  // namespace

KernelStatus SgmvShrinkCpu(const SgmvShrinkParams& p) {
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.in <= 0 || p.ldt <= 0) return KernelStatus::kInvalidShape;
  const int ldx = p.ldx == 0 ? p.in : p.ldx;
  if (ldx < p.in) return KernelStatus::kInvalidShape;
  const KernelStatus st = CheckSegments(p.seg_starts, p.ranks, p.num_segments, p.num_rows, p.ldt);
  if (st != KernelStatus::kOk || p.num_segments == 0) return st;
  if (p.a == nullptr) return KernelStatus::kNullPointer;
  const auto* x = static_cast<const float*>(p.x);
  for (int s = 0; s < p.num_segments; ++s) {
    const int begin = p.seg_starts[s], rows = p.seg_starts[s + 1] - begin, r = p.ranks[s];
    if (rows == 0 || r == 0 || p.a[s] == nullptr) continue;
    if (x == nullptr || p.t == nullptr) return KernelStatus::kNullPointer;
    // t[rows, r] = x[rows, in] · A[r, in]ᵀ
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, r, p.in, 1.0f,
                x + static_cast<size_t>(begin) * ldx, ldx, static_cast<const float*>(p.a[s]), p.in,
                0.0f, p.t + static_cast<size_t>(begin) * p.ldt, p.ldt);
  }
  return KernelStatus::kOk;
}

KernelStatus SgmvExpandCpu(const SgmvExpandParams& p) {
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.out <= 0 || p.ldt <= 0) return KernelStatus::kInvalidShape;
  const int ldy = p.ldy == 0 ? p.out : p.ldy;
  if (ldy < p.out) return KernelStatus::kInvalidShape;
  const KernelStatus st = CheckSegments(p.seg_starts, p.ranks, p.num_segments, p.num_rows, p.ldt);
  if (st != KernelStatus::kOk || p.num_segments == 0) return st;
  if (p.b == nullptr) return KernelStatus::kNullPointer;
  auto* y = static_cast<float*>(p.y);
  for (int s = 0; s < p.num_segments; ++s) {
    const int begin = p.seg_starts[s], rows = p.seg_starts[s + 1] - begin, r = p.ranks[s];
    if (rows == 0 || r == 0 || p.b[s] == nullptr) continue;
    if (y == nullptr || p.t == nullptr) return KernelStatus::kNullPointer;
    const float scale = p.scales == nullptr ? 1.0f : p.scales[s];
    // y[rows, out] += scale · t[rows, r] · B[out, r]ᵀ
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, p.out, r, scale,
                p.t + static_cast<size_t>(begin) * p.ldt, p.ldt, static_cast<const float*>(p.b[s]),
                r, 1.0f, y + static_cast<size_t>(begin) * ldy, ldy);
  }
  return KernelStatus::kOk;
}

namespace {

// Checks the fields shared by both grouped ops; *tiles = the tile count to use.
KernelStatus CheckTableRef(const SgmvTableRef& r, int num_ops, int* tiles) {
  if (num_ops < 0 || num_ops > kSgmvMaxOps || r.num_rows < 0 || r.max_rank < 0 || r.max_tiles < 0 ||
      r.stride < 0 || r.num_slots < 0) {
    return KernelStatus::kInvalidShape;
  }
  *tiles = 0;
  if (num_ops == 0 || r.max_tiles == 0 || r.num_rows == 0) return KernelStatus::kOk;
  if (r.num_tiles == nullptr || r.tiles == nullptr || r.table == nullptr) {
    return KernelStatus::kNullPointer;
  }
  *tiles = std::clamp(*r.num_tiles, 0, r.max_tiles);
  return KernelStatus::kOk;
}

// The weight of `entry` for `tile`, or null when the tile's slot is outside the table.
const SgmvWeight* WeightOf(const SgmvTableRef& r, const SgmvTile& tile, int entry) {
  if (tile.slot < 0 || tile.slot >= r.num_slots || entry < 0 || entry >= r.stride) return nullptr;
  return r.table + static_cast<size_t>(tile.slot) * r.stride + entry;
}

// Rows [begin, end) of a tile clamped to the buffer; false when nothing is left.
bool TileRows(const SgmvTableRef& r, const SgmvTile& tile, int32_t seg[2]) {
  seg[0] = std::clamp(tile.begin, 0, r.num_rows);
  seg[1] = std::clamp(std::min(tile.end, tile.begin + kSgmvTileRows), seg[0], r.num_rows);
  return seg[1] > seg[0];
}

}  // namespace

KernelStatus SgmvGroupedShrinkCpu(const SgmvGroupedShrinkParams& p) {
  int tiles = 0;
  if (KernelStatus st = CheckTableRef(p.ref, p.num_ops, &tiles); st != KernelStatus::kOk) return st;
  for (int o = 0; o < p.num_ops; ++o) {
    if (p.ops[o].in <= 0 || p.ops[o].t_col < 0 || p.ops[o].t_col + p.ref.max_rank > p.ldt) {
      return KernelStatus::kInvalidShape;
    }
  }
  for (int i = 0; i < tiles; ++i) {
    const SgmvTile& tile = p.ref.tiles[i];
    int32_t seg[2];
    if (!TileRows(p.ref, tile, seg)) continue;
    for (int o = 0; o < p.num_ops; ++o) {
      const SgmvShrinkOp& op = p.ops[o];
      const SgmvWeight* w = WeightOf(p.ref, tile, op.entry);
      if (w == nullptr || w->a == nullptr) continue;
      const int32_t rank = std::clamp(w->rank, 0, p.ref.max_rank);
      const void* a = w->a;
      const KernelStatus st = SgmvShrinkCpu({.x = op.x,
                                             .t = p.t + op.t_col,
                                             .seg_starts = seg,
                                             .a = &a,
                                             .ranks = &rank,
                                             .num_segments = 1,
                                             .num_rows = p.ref.num_rows,
                                             .in = op.in,
                                             .ldx = op.ldx,
                                             .ldt = p.ldt,
                                             .dtype = p.dtype});
      if (st != KernelStatus::kOk) return st;
    }
  }
  return KernelStatus::kOk;
}

KernelStatus SgmvGroupedExpandCpu(const SgmvGroupedExpandParams& p) {
  int tiles = 0;
  if (KernelStatus st = CheckTableRef(p.ref, p.num_ops, &tiles); st != KernelStatus::kOk) return st;
  for (int o = 0; o < p.num_ops; ++o) {
    const SgmvExpandOp& op = p.ops[o];
    if (op.out <= 0 || op.num_terms < 1 || op.num_terms > kSgmvMaxTerms) {
      return KernelStatus::kInvalidShape;
    }
    for (int k = 0; k < op.num_terms; ++k) {
      if (op.terms[k].t_col < 0 || op.terms[k].t_col + p.ref.max_rank > p.ldt) {
        return KernelStatus::kInvalidShape;
      }
    }
  }
  for (int i = 0; i < tiles; ++i) {
    const SgmvTile& tile = p.ref.tiles[i];
    int32_t seg[2];
    if (!TileRows(p.ref, tile, seg)) continue;
    for (int o = 0; o < p.num_ops; ++o) {
      const SgmvExpandOp& op = p.ops[o];
      for (int k = 0; k < op.num_terms; ++k) {
        const SgmvWeight* w = WeightOf(p.ref, tile, op.terms[k].entry);
        if (w == nullptr || w->b == nullptr) continue;
        const int32_t rank = std::clamp(w->rank, 0, p.ref.max_rank);
        const void* b = w->b;
        const KernelStatus st = SgmvExpandCpu({.t = p.t + op.terms[k].t_col,
                                               .y = op.y,
                                               .seg_starts = seg,
                                               .b = &b,
                                               .ranks = &rank,
                                               .scales = &w->scale,
                                               .num_segments = 1,
                                               .num_rows = p.ref.num_rows,
                                               .out = op.out,
                                               .ldy = op.ldy,
                                               .ldt = p.ldt,
                                               .dtype = p.dtype});
        if (st != KernelStatus::kOk) return st;
      }
    }
  }
  return KernelStatus::kOk;
}

KernelStatus SgmvFusedCpu(const SgmvFusedParams& p) {
  int tiles = 0;
  if (KernelStatus st = CheckTableRef(p.ref, p.num_ops, &tiles); st != KernelStatus::kOk) return st;
  for (int o = 0; o < p.num_ops; ++o) {
    const SgmvFusedOp& op = p.ops[o];
    if (op.out <= 0 || op.num_terms < 1 || op.num_terms > kSgmvMaxTerms) {
      return KernelStatus::kInvalidShape;
    }
    for (int k = 0; k < op.num_terms; ++k) {
      if (op.terms[k].in <= 0) return KernelStatus::kInvalidShape;
    }
  }
  if (tiles == 0) return KernelStatus::kOk;
  // t [num_rows, kSgmvMaxTerms x max_rank]: each term's shrink, then the op's two-term expand.
  const int ldt = std::max(1, kSgmvMaxTerms * p.ref.max_rank);
  std::vector<float> t(static_cast<size_t>(p.ref.num_rows) * ldt, 0.0f);
  for (int o = 0; o < p.num_ops; ++o) {
    const SgmvFusedOp& op = p.ops[o];
    std::fill(t.begin(), t.end(), 0.0f);  // a term whose A is missing adds nothing
    SgmvGroupedShrinkParams sp;
    SgmvGroupedExpandParams ep;
    ep.ops[0].y = op.y;
    ep.ops[0].ldy = op.ldy;
    ep.ops[0].out = op.out;
    ep.ops[0].num_terms = op.num_terms;
    for (int k = 0; k < op.num_terms; ++k) {
      const SgmvFusedTerm& term = op.terms[k];
      sp.ops[k] = {.x = term.x,
                   .ldx = term.ldx,
                   .in = term.in,
                   .t_col = k * p.ref.max_rank,
                   .entry = term.entry};
      ep.ops[0].terms[k] = {k * p.ref.max_rank, term.entry};
    }
    sp.num_ops = op.num_terms;
    if (op.delta != nullptr) {  // delta-only: expand into -0.0f rows (the add's identity)
      const int ldd = op.ld_delta == 0 ? op.out : op.ld_delta;
      if (ldd < op.out) return KernelStatus::kInvalidShape;
      for (int i = 0; i < tiles; ++i) {
        int32_t seg[2];
        if (!TileRows(p.ref, p.ref.tiles[i], seg)) continue;
        for (int r = seg[0]; r < seg[1]; ++r) {
          std::fill_n(op.delta + static_cast<size_t>(r) * ldd, op.out, -0.0f);
        }
      }
      ep.ops[0].y = op.delta;
      ep.ops[0].ldy = ldd;
    }
    sp.t = t.data();
    sp.ldt = ldt;
    sp.ref = p.ref;
    sp.dtype = p.dtype;
    if (KernelStatus st = SgmvGroupedShrinkCpu(sp); st != KernelStatus::kOk) return st;
    ep.num_ops = 1;
    ep.t = t.data();
    ep.ldt = ldt;
    ep.ref = p.ref;
    ep.dtype = p.dtype;
    if (KernelStatus st = SgmvGroupedExpandCpu(ep); st != KernelStatus::kOk) return st;
  }
  return KernelStatus::kOk;
}

KernelStatus SgmvFoldCpu(const SgmvFoldParams& p, GemmEpilogue act) {
  if (act != GemmEpilogue::kNone && act != GemmEpilogue::kGeluTanh &&
      act != GemmEpilogue::kGeluErf) {
    return KernelStatus::kInvalidShape;
  }
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.num_ops < 0 || p.num_ops > kSgmvMaxOps || p.ref.num_rows < 0 || p.ref.max_tiles < 0) {
    return KernelStatus::kInvalidShape;
  }
  if (p.num_ops == 0 || p.ref.max_tiles == 0 || p.ref.num_rows == 0) return KernelStatus::kOk;
  if (p.ref.num_tiles == nullptr || p.ref.tiles == nullptr) return KernelStatus::kNullPointer;
  for (int o = 0; o < p.num_ops; ++o) {
    const SgmvFoldOp& op = p.ops[o];
    if (op.out <= 0 || (op.ldy != 0 && op.ldy < op.out) ||
        (op.ld_delta != 0 && op.ld_delta < op.out)) {
      return KernelStatus::kInvalidShape;
    }
    if (op.y == nullptr || op.delta == nullptr) return KernelStatus::kNullPointer;
  }
  const int tiles = std::clamp(*p.ref.num_tiles, 0, p.ref.max_tiles);
  for (int o = 0; o < p.num_ops; ++o) {
    const SgmvFoldOp& op = p.ops[o];
    const int ldy = op.ldy == 0 ? op.out : op.ldy, ldd = op.ld_delta == 0 ? op.out : op.ld_delta;
    for (int i = 0; i < tiles; ++i) {
      int32_t seg[2];
      if (!TileRows(p.ref, p.ref.tiles[i], seg)) continue;
      for (int r = seg[0]; r < seg[1]; ++r) {
        float* y = static_cast<float*>(op.y) + static_cast<size_t>(r) * ldy;
        const float* d = op.delta + static_cast<size_t>(r) * ldd;
        for (int j = 0; j < op.out; ++j) {
          const float v = y[j] + d[j];
          y[j] = act == GemmEpilogue::kGeluTanh  ? GeluTanh(v)
                 : act == GemmEpilogue::kGeluErf ? GeluErf(v)
                                                 : v;
        }
      }
    }
  }
  return KernelStatus::kOk;
}

}  // namespace phishard
