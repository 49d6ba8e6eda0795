// Shared by the SGMV GPU tests (cuda_sgmv_test.cc: grouped shrink / expand and the decode
// expand; cuda_sgmv_fused_test.cc: the fused decode kernel and its delta-only form): the swept
// cases (decode rows, prefill segments, base rows between, a grid larger than the tile count, a
// tile of an unknown slot), four op shapes with x / y as column windows of wider buffers, five
// slots of ranks 3-128 (0 = not adapted), and their host values rounded to the device dtype with
// device copies. Sweep and tolerance rationale: cuda_sgmv_test.cc's header.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/sgmv_cuda.h"
#include "kernels/sgmv.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard::sgmv_test {

using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using testing_util::RandomVector;

inline constexpr float kNaN = testing_util::kNaN;

inline double StorageUnit(DataType t) {
  return t == DataType::kBF16 ? 1.0 / 256 : (t == DataType::kF16 ? 1.0 / 2048 : 1.0 / (1 << 23));
}

// A run of rows: slot >= 0 an adapter, -1 base rows (no tile).
struct Run {
  int slot;
  int rows;
};

struct Case {
  std::string name;
  std::vector<Run> runs;
  int extra_tiles = 0;  // grid tiles beyond the count
  bool bad_slot_tile = false;
};

// One op's shape: shrink x window [rows, in] of ldx, expand y window [rows, out] of ldy.
struct OpShape {
  int in, ldx, out, ldy;
};

// Per slot, rank of each op's module (0 = not adapted: null A and B).
inline constexpr int kRanks[][4] = {
    {16, 16, 16, 64}, {8, 3, 0, 128}, {64, 128, 16, 16}, {128, 8, 64, 0}, {3, 0, 128, 128}};
inline constexpr int kSlots = 5;
inline constexpr int kOps = 4;
inline constexpr int kMaxRank = 128;

struct Data {
  DataType dt;
  int rows = 0;
  std::vector<SgmvTile> tiles;
  std::vector<OpShape> ops;
  // Host values (rounded to dt) and their device encodings.
  std::vector<std::vector<float>> x, a, b;  // x per op; a / b per (slot, op)
  std::vector<float> scales;                // per (slot, op)
  std::vector<DeviceBuffer> dev;            // keeps device memory alive
  std::vector<SgmvWeight> table_dev, table_cpu;
};

inline Data MakeData(const Case& c, DataType dt, uint32_t seed) {
  Data d;
  d.dt = dt;
  for (const Run& r : c.runs) {
    if (r.slot >= 0) {
      for (int b = d.rows; b < d.rows + r.rows; b += kSgmvTileRows) {
        d.tiles.push_back({r.slot, b, std::min(d.rows + r.rows, b + kSgmvTileRows), 0});
      }
    }
    d.rows += r.rows;
  }
  if (c.bad_slot_tile) d.tiles.push_back({kSlots + 3, 0, 1, 0});
  d.ops = {{2560, 2560, 80, 96},
           {80, 96, 1000, 1000},
           {1000, 1008, 64, 2560},
           {10240, 10240, 2560, 2560}};
  for (int o = 0; o < kOps; ++o) {
    const OpShape& s = d.ops[o];
    std::vector<float> x = RandomVector(static_cast<size_t>(d.rows) * s.ldx, seed + o);
    for (int i = 0; i < d.rows; ++i) {
      for (int k = s.in; k < s.ldx; ++k) x[static_cast<size_t>(i) * s.ldx + k] = kNaN;
    }
    std::vector<char> bytes = Encode(x, dt);
    d.dev.push_back(DeviceBuffer::From(bytes));
    d.x.push_back(x);
  }
  d.table_dev.assign(kSlots * kOps, SgmvWeight{});
  d.table_cpu.assign(kSlots * kOps, SgmvWeight{});
  d.a.resize(kSlots * kOps);
  d.b.resize(kSlots * kOps);
  d.scales.assign(kSlots * kOps, 0.0f);
  for (int s = 0; s < kSlots; ++s) {
    for (int o = 0; o < kOps; ++o) {
      const int r = kRanks[s][o], e = s * kOps + o;
      if (r == 0) continue;
      d.a[e] = RandomVector(static_cast<size_t>(r) * d.ops[o].in, seed * 7 + e, -0.5f, 0.5f);
      d.b[e] = RandomVector(static_cast<size_t>(d.ops[o].out) * r, seed * 13 + e, -0.5f, 0.5f);
      d.scales[e] = 0.25f + 0.5f * s;
      std::vector<char> ab = Encode(d.a[e], dt), bb = Encode(d.b[e], dt);
      d.dev.push_back(DeviceBuffer::From(ab));
      const void* da = d.dev.back().get();
      d.dev.push_back(DeviceBuffer::From(bb));
      const void* db = d.dev.back().get();
      d.table_dev[e] = {da, db, r, d.scales[e]};
      d.table_cpu[e] = {d.a[e].data(), d.b[e].data(), r, d.scales[e]};
    }
  }
  return d;
}

inline SgmvTableRef MakeRef(const Data& d, const SgmvWeight* table, const SgmvTile* tiles,
                            const int32_t* count, int max_tiles) {
  SgmvTableRef r;
  r.table = table;
  r.stride = kOps;
  r.num_slots = kSlots;
  r.tiles = tiles;
  r.num_tiles = count;
  r.max_tiles = max_tiles;
  r.num_rows = d.rows;
  r.max_rank = kMaxRank;
  return r;
}

// A step on the device: d's tiles, then `extra_tiles` garbage tiles past the count (the kernels
// must not read them), the tile count, and `table` ([kSlots, kOps] SgmvWeight with device
// pointers); ref is MakeRef over those three.
struct DeviceStep {
  gpu_test::DeviceBuffer tiles, count, table;
  SgmvTableRef ref;
};

inline DeviceStep UploadStep(const Data& d, const std::vector<SgmvWeight>& table, int extra_tiles) {
  std::vector<SgmvTile> dev_tiles = d.tiles;
  for (int i = 0; i < extra_tiles; ++i) dev_tiles.push_back({0, 0, d.rows, 0});
  DeviceStep s;
  s.tiles = gpu_test::DeviceBuffer::From(dev_tiles);
  s.count =
      gpu_test::DeviceBuffer::From(std::vector<int32_t>{static_cast<int32_t>(d.tiles.size())});
  s.table = gpu_test::DeviceBuffer::From(table);
  s.ref = MakeRef(d, s.table.as<SgmvWeight>(), s.tiles.as<SgmvTile>(), s.count.as<int32_t>(),
                  static_cast<int>(dev_tiles.size()));
  return s;
}

// Per row of `d`: the slot of the tile holding it (-1: no tile, or a slot outside the table), and
// whether any tile holds it.
inline void RowSlots(const Data& d, std::vector<int>* row_slot, std::vector<bool>* in_tile) {
  row_slot->assign(d.rows, -1);
  in_tile->assign(d.rows, false);
  for (const SgmvTile& tile : d.tiles) {
    for (int i = tile.begin; i < tile.end; ++i) {
      (*in_tile)[i] = true;
      if (tile.slot >= 0 && tile.slot < kSlots) (*row_slot)[i] = tile.slot;
    }
  }
}

// Every op's y window buffer [rows, ldy]: random values in [-3, 3] (op o from seed seed0 + o)
// rounded to dt on the host (y0), their dt bytes and device copies.
struct OpOutputs {
  std::vector<std::vector<float>> y0;
  std::vector<std::vector<char>> y0_bytes;
  std::vector<DeviceBuffer> ydev;
};

inline OpOutputs MakeOpOutputs(const Data& d, DataType dt, uint32_t seed0) {
  OpOutputs out;
  out.y0.resize(kOps);
  out.y0_bytes.resize(kOps);
  for (int o = 0; o < kOps; ++o) {
    out.y0[o] = RandomVector(static_cast<size_t>(d.rows) * d.ops[o].ldy, seed0 + o, -3.0f, 3.0f);
    out.y0_bytes[o] = Encode(out.y0[o], dt);
    out.ydev.push_back(DeviceBuffer::From(out.y0_bytes[o]));
  }
  return out;
}

inline const Case kCases[] = {
    {"decode rows, one adapter each, base rows between",
     {{0, 1}, {1, 1}, {-1, 1}, {2, 1}, {3, 1}, {3, 1}, {-1, 2}, {4, 1}, {0, 1}, {2, 1}},
     0,
     false},
    {"prefill segments of 1, 5, 17, 33 rows, base between",
     {{2, 17}, {-1, 5}, {0, 1}, {3, 33}, {-1, 3}, {1, 5}, {4, 16}},
     0,
     false},
    {"grid larger than the tile count, a tile of an unknown slot",
     {{-1, 2}, {3, 20}, {0, 3}},
     7,
     true},
    {"base rows only (no tile)", {{-1, 9}}, 3, false},
};

}  // namespace phishard::sgmv_test
