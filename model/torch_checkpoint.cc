#include "model/torch_checkpoint.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;

// Bounds for hostile input (a Phi-2 state dict has ~450 tensors and a pickle of ~50 KB).
constexpr uint64_t kMaxZipEntries = 1 << 20;
constexpr size_t kMaxPickleValues = size_t{1} << 24;  // stack + memo entries

uint64_t Le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// ---------------------------------------------------------------------------------------------
// ZIP (stored entries only: torch.save never compresses)

struct ZipEntry {
  uint64_t offset = 0;  // of the data in the file
  uint64_t size = 0;
};

absl::StatusOr<std::map<std::string, ZipEntry>> ReadZip(const uint8_t* f, uint64_t n,
                                                        const std::string& where) {
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", what));
  };
  if (n < 22) return bad("too short for a ZIP archive");
  // End of central directory: the last signature within the 64 KiB comment window.
  uint64_t eocd = UINT64_MAX;
  for (uint64_t i = n - 22 + 1; i-- > 0 && n - 22 - i <= 65535;) {
    if (Le(f + i, 4) == 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd == UINT64_MAX) {
    return bad(
        "not a ZIP archive (no end of central directory); legacy (pre-1.6) torch.save files "
        "are not supported: re-save it with a current torch or convert it to safetensors");
  }
  uint64_t entries = Le(f + eocd + 10, 2), cd_size = Le(f + eocd + 12, 4);
  uint64_t cd_offset = Le(f + eocd + 16, 4);
  if (entries == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {  // ZIP64
    if (eocd < 20 || Le(f + eocd - 20, 4) != 0x07064b50) return bad("ZIP64 locator missing");
    const uint64_t z = Le(f + eocd - 20 + 8, 8);
    if (z > n || n - z < 56 || Le(f + z, 4) != 0x06064b50) return bad("bad ZIP64 end record");
    entries = Le(f + z + 32, 8);
    cd_size = Le(f + z + 40, 8);
    cd_offset = Le(f + z + 48, 8);
  }
  if (entries > kMaxZipEntries || cd_offset > n || cd_size > n - cd_offset) {
    return bad("central directory out of range");
  }
  std::map<std::string, ZipEntry> out;
  uint64_t at = cd_offset;
  const uint64_t cd_end = cd_offset + cd_size;
  for (uint64_t e = 0; e < entries; ++e) {
    if (cd_end - at < 46 || Le(f + at, 4) != 0x02014b50) return bad("bad central directory entry");
    const uint64_t method = Le(f + at + 10, 2);
    uint64_t csize = Le(f + at + 20, 4), usize = Le(f + at + 24, 4);
    const uint64_t name_len = Le(f + at + 28, 2), extra_len = Le(f + at + 30, 2);
    const uint64_t comment_len = Le(f + at + 32, 2);
    uint64_t local = Le(f + at + 42, 4);
    if (cd_end - at - 46 < name_len + extra_len + comment_len)
      return bad("entry runs past the end");
    const std::string name(reinterpret_cast<const char*>(f + at + 46), name_len);
    // ZIP64 extra field: the 64-bit values of the fields that read 0xFFFFFFFF, in order.
    for (uint64_t x = at + 46 + name_len; x + 4 <= at + 46 + name_len + extra_len;) {
      const uint64_t id = Le(f + x, 2), len = Le(f + x + 2, 2);
      if (x + 4 + len > at + 46 + name_len + extra_len) return bad("bad extra field");
      if (id == 0x0001) {
        uint64_t y = x + 4;
        for (uint64_t* v : {&usize, &csize, &local}) {
          if (*v != 0xFFFFFFFF) continue;
          if (y + 8 > x + 4 + len) return bad("short ZIP64 extra field");
          *v = Le(f + y, 8);
          y += 8;
        }
      }
      x += 4 + len;
    }
    at += 46 + name_len + extra_len + comment_len;
    if (method != 0 || csize != usize) {
      return bad(absl::StrCat("entry '", name, "' is compressed; torch.save stores entries"));
    }
    if (local > n || n - local < 30 || Le(f + local, 4) != 0x04034b50) {
      return bad(absl::StrCat("entry '", name, "': bad local header"));
    }
    const uint64_t data = local + 30 + Le(f + local + 26, 2) + Le(f + local + 28, 2);
    if (data > n || usize > n - data) {
      return bad(absl::StrCat("entry '", name, "' runs past the end of the file"));
    }
    out[name] = {data, usize};
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The restricted unpickler

struct Value;
using ValuePtr = std::shared_ptr<Value>;

struct Value {
  enum Kind { kNone, kBool, kInt, kFloat, kStr, kTuple, kList, kDict, kGlobal, kStorage, kTensor };
  Kind kind = kNone;
  int64_t i = 0;
  double d = 0;
  std::string s, s2;            // kStr: s; kGlobal: module, name; kStorage: dtype, key
  std::vector<ValuePtr> items;  // kTuple, kList; kTensor: {storage}
  std::vector<std::pair<ValuePtr, ValuePtr>> dict;
  std::vector<int64_t> size, stride;  // kTensor
  int64_t offset = 0;                 // kTensor: storage offset (elements)
};

ValuePtr Make(Value::Kind k) {
  auto v = std::make_shared<Value>();
  v->kind = k;
  return v;
}

// A storage class's dtype name (as safetensors spells dtypes), or "" when unknown.
std::string StorageDtype(const std::string& cls) {
  static constexpr std::pair<std::string_view, std::string_view> kTypes[] = {
      {"FloatStorage", "F32"},  {"HalfStorage", "F16"}, {"BFloat16Storage", "BF16"},
      {"DoubleStorage", "F64"}, {"LongStorage", "I64"}, {"IntStorage", "I32"},
      {"ShortStorage", "I16"},  {"CharStorage", "I8"},  {"ByteStorage", "U8"},
      {"BoolStorage", "BOOL"}};
  for (const auto& [name, dtype] : kTypes) {
    if (cls == name) return std::string(dtype);
  }
  return "";
}

int DtypeBytes(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64") return 8;
  if (dtype == "F32" || dtype == "I32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16") return 2;
  return 1;
}

absl::StatusOr<std::vector<int64_t>> IntTuple(const ValuePtr& v, absl::string_view what) {
  if (v->kind != Value::kTuple && v->kind != Value::kList) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is not a tuple"));
  }
  std::vector<int64_t> out;
  for (const ValuePtr& x : v->items) {
    if (x->kind != Value::kInt || x->i < 0) {
      return absl::InvalidArgumentError(absl::StrCat(what, " holds a non-integer"));
    }
    out.push_back(x->i);
  }
  return out;
}

class Unpickler {
 public:
  Unpickler(const uint8_t* p, uint64_t n, std::string where) : p_(p), n_(n), where_(where) {}

  absl::StatusOr<ValuePtr> Run() {
    while (true) {
      uint8_t op = 0;
      PHI_RETURN_IF_ERROR(Byte(&op));
      switch (op) {
        case 0x80: {  // PROTO
          uint8_t v = 0;
          PHI_RETURN_IF_ERROR(Byte(&v));
          break;
        }
        case 0x95: {  // FRAME (protocol 4+): a length we do not need
          const uint8_t* x = nullptr;
          PHI_RETURN_IF_ERROR(Take(8, &x));
          break;
        }
        case '.':  // STOP
          if (stack_.size() != 1) return Bad("STOP with a stack of other than one value");
          return stack_.back();
        case 'N':
          PHI_RETURN_IF_ERROR(Push(Make(Value::kNone)));
          break;
        case 0x88:
        case 0x89: {  // NEWTRUE / NEWFALSE
          ValuePtr v = Make(Value::kBool);
          v->i = op == 0x88;
          PHI_RETURN_IF_ERROR(Push(v));
          break;
        }
        case 'J':
        case 'K':
        case 'M': {  // BININT (4, signed), BININT1, BININT2 (unsigned)
          const int len = op == 'J' ? 4 : op == 'K' ? 1 : 2;
          const uint8_t* x = nullptr;
          PHI_RETURN_IF_ERROR(Take(len, &x));
          ValuePtr v = Make(Value::kInt);
          v->i = op == 'J' ? static_cast<int32_t>(Le(x, 4)) : static_cast<int64_t>(Le(x, len));
          PHI_RETURN_IF_ERROR(Push(v));
          break;
        }
        case 0x8a: {  // LONG1: n bytes, little-endian two's complement
          uint8_t len = 0;
          PHI_RETURN_IF_ERROR(Byte(&len));
          if (len > 8) return Bad("integer wider than 64 bits");
          const uint8_t* x = nullptr;
          PHI_RETURN_IF_ERROR(Take(len, &x));
          uint64_t u = Le(x, len);
          if (len > 0 && len < 8 && (x[len - 1] & 0x80)) u |= ~uint64_t{0} << (8 * len);
          ValuePtr v = Make(Value::kInt);
          v->i = static_cast<int64_t>(u);
          PHI_RETURN_IF_ERROR(Push(v));
          break;
        }
        case 'G': {  // BINFLOAT, big-endian double
          const uint8_t* x = nullptr;
          PHI_RETURN_IF_ERROR(Take(8, &x));
          uint64_t u = 0;
          for (int i = 0; i < 8; ++i) u = (u << 8) | x[i];
          ValuePtr v = Make(Value::kFloat);
          std::memcpy(&v->d, &u, 8);
          PHI_RETURN_IF_ERROR(Push(v));
          break;
        }
        case 'X':
        case 0x8c:
        case 0x8d:
        case 'B':
        case 'C': {  // BINUNICODE (4), SHORT_BINUNICODE (1), BINUNICODE8, BINBYTES, SHORT_BINBYTES
          const int lb = (op == 0x8c || op == 'C') ? 1 : op == 0x8d ? 8 : 4;
          const uint8_t* x = nullptr;
          PHI_RETURN_IF_ERROR(Take(lb, &x));
          const uint64_t len = Le(x, lb);
          PHI_RETURN_IF_ERROR(Take(len, &x));
          ValuePtr v = Make(Value::kStr);
          v->s.assign(reinterpret_cast<const char*>(x), len);
          PHI_RETURN_IF_ERROR(Push(v));
          break;
        }
        case '(':  // MARK
          marks_.push_back(stack_.size());
          break;
        case ')':
          PHI_RETURN_IF_ERROR(Push(Make(Value::kTuple)));
          break;
        case ']':
          PHI_RETURN_IF_ERROR(Push(Make(Value::kList)));
          break;
        case '}':
          PHI_RETURN_IF_ERROR(Push(Make(Value::kDict)));
          break;
        case 't': {  // TUPLE: everything since the mark
          std::vector<ValuePtr> items;
          PHI_RETURN_IF_ERROR(PopMark(&items));
          ValuePtr v = Make(Value::kTuple);
          v->items = std::move(items);
          PHI_RETURN_IF_ERROR(Push(v));
          break;
        }
        case 0x85:
        case 0x86:
        case 0x87: {  // TUPLE1..3
          const size_t k = op - 0x84;
          if (stack_.size() < k + Floor()) return Bad("stack underflow");
          ValuePtr v = Make(Value::kTuple);
          v->items.assign(stack_.end() - k, stack_.end());
          stack_.resize(stack_.size() - k);
          PHI_RETURN_IF_ERROR(Push(v));
          break;
        }
        case 'q':
        case 'r':
        case 0x94: {  // BINPUT, LONG_BINPUT, MEMOIZE
          if (stack_.empty()) return Bad("memo of an empty stack");
          uint64_t key = memo_.size();
          if (op != 0x94) {
            const uint8_t* x = nullptr;
            PHI_RETURN_IF_ERROR(Take(op == 'q' ? 1 : 4, &x));
            key = Le(x, op == 'q' ? 1 : 4);
          }
          if (memo_.size() >= kMaxPickleValues) return Bad("too many memo entries");
          memo_[key] = stack_.back();
          break;
        }
        case 'h':
        case 'j': {  // BINGET, LONG_BINGET
          const uint8_t* x = nullptr;
          PHI_RETURN_IF_ERROR(Take(op == 'h' ? 1 : 4, &x));
          auto it = memo_.find(Le(x, op == 'h' ? 1 : 4));
          if (it == memo_.end()) return Bad("memo key not set");
          PHI_RETURN_IF_ERROR(Push(it->second));
          break;
        }
        case 'c': {  // GLOBAL "module\nname\n"
          ValuePtr g = Make(Value::kGlobal);
          PHI_RETURN_IF_ERROR(Line(&g->s));
          PHI_RETURN_IF_ERROR(Line(&g->s2));
          PHI_RETURN_IF_ERROR(Push(g));
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          ValuePtr name, module;
          PHI_RETURN_IF_ERROR(Pop(&name));
          PHI_RETURN_IF_ERROR(Pop(&module));
          if (name->kind != Value::kStr || module->kind != Value::kStr) {
            return Bad("STACK_GLOBAL of non-strings");
          }
          ValuePtr g = Make(Value::kGlobal);
          g->s = module->s;
          g->s2 = name->s;
          PHI_RETURN_IF_ERROR(Push(g));
          break;
        }
        case 'Q': {  // BINPERSID: ('storage', class, key, location, numel)
          ValuePtr pid;
          PHI_RETURN_IF_ERROR(Pop(&pid));
          PHI_RETURN_IF_ERROR(Push(Storage(pid)));
          break;
        }
        case 'R':
        case 0x81: {  // REDUCE / NEWOBJ: callable(*args)
          ValuePtr args, fn;
          PHI_RETURN_IF_ERROR(Pop(&args));
          PHI_RETURN_IF_ERROR(Pop(&fn));
          absl::StatusOr<ValuePtr> v = Call(fn, args);
          if (!v.ok()) return v.status();
          PHI_RETURN_IF_ERROR(Push(*v));
          break;
        }
        case 'b': {  // BUILD: an object's state (OrderedDict's _metadata, ...): not needed
          ValuePtr state;
          PHI_RETURN_IF_ERROR(Pop(&state));
          if (stack_.empty()) return Bad("BUILD of an empty stack");
          break;
        }
        case 's':
        case 'u': {  // SETITEM, SETITEMS
          std::vector<ValuePtr> kv;
          if (op == 's') {
            if (stack_.size() < 3 + Floor()) return Bad("stack underflow");
            kv.assign(stack_.end() - 2, stack_.end());
            stack_.resize(stack_.size() - 2);
          } else {
            PHI_RETURN_IF_ERROR(PopMark(&kv));
          }
          if (stack_.empty() || stack_.back()->kind != Value::kDict || kv.size() % 2 != 0) {
            return Bad("SETITEM(S) on something other than a dict");
          }
          for (size_t i = 0; i < kv.size(); i += 2)
            stack_.back()->dict.emplace_back(kv[i], kv[i + 1]);
          break;
        }
        case 'a':
        case 'e': {  // APPEND, APPENDS
          std::vector<ValuePtr> xs;
          if (op == 'a') {
            ValuePtr x;
            PHI_RETURN_IF_ERROR(Pop(&x));
            xs.push_back(x);
          } else {
            PHI_RETURN_IF_ERROR(PopMark(&xs));
          }
          if (stack_.empty() || stack_.back()->kind != Value::kList) {
            return Bad("APPEND(S) on something other than a list");
          }
          for (ValuePtr& x : xs) stack_.back()->items.push_back(std::move(x));
          break;
        }
        default:
          return Bad(absl::StrFormat("unsupported pickle opcode 0x%02x at byte %d", op, at_ - 1));
      }
    }
  }

 private:
  absl::Status Bad(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(where_, ": data.pkl: ", what));
  }
  absl::Status Take(uint64_t len, const uint8_t** x) {
    if (len > n_ - at_) return Bad("truncated");
    *x = p_ + at_;
    at_ += len;
    return absl::OkStatus();
  }
  absl::Status Byte(uint8_t* b) {
    const uint8_t* x = nullptr;
    PHI_RETURN_IF_ERROR(Take(1, &x));
    *b = *x;
    return absl::OkStatus();
  }
  absl::Status Line(std::string* out) {
    const void* nl = std::memchr(p_ + at_, '\n', n_ - at_);
    if (nl == nullptr) return Bad("truncated GLOBAL");
    const uint64_t len = static_cast<const uint8_t*>(nl) - (p_ + at_);
    out->assign(reinterpret_cast<const char*>(p_ + at_), len);
    at_ += len + 1;
    return absl::OkStatus();
  }
  absl::Status Push(ValuePtr v) {
    if (stack_.size() >= kMaxPickleValues) return Bad("stack too deep");
    stack_.push_back(std::move(v));
    return absl::OkStatus();
  }
  // The stack's lowest slot above the innermost MARK: values below it are not the current
  // opcode's to take.
  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  absl::Status Pop(ValuePtr* v) {
    if (stack_.size() <= Floor()) return Bad("stack underflow");
    *v = std::move(stack_.back());
    stack_.pop_back();
    return absl::OkStatus();
  }
  absl::Status PopMark(std::vector<ValuePtr>* items) {
    if (marks_.empty()) return Bad("no MARK");
    const size_t m = marks_.back();
    marks_.pop_back();
    if (m > stack_.size()) return Bad("MARK above the stack");
    items->assign(stack_.begin() + m, stack_.end());
    stack_.resize(m);
    return absl::OkStatus();
  }

  ValuePtr Storage(const ValuePtr& pid) {
    // Invalid ids become a kNone that Call rejects with a message.
    if (pid->kind != Value::kTuple || pid->items.size() < 5 || pid->items[0]->s != "storage" ||
        pid->items[1]->kind != Value::kGlobal || pid->items[2]->kind != Value::kStr ||
        pid->items[4]->kind != Value::kInt) {
      return Make(Value::kNone);
    }
    ValuePtr st = Make(Value::kStorage);
    st->s = StorageDtype(pid->items[1]->s2);
    if (st->s.empty() || pid->items[1]->s != "torch") st->s = "?" + pid->items[1]->s2;
    st->s2 = pid->items[2]->s;
    st->i = pid->items[4]->i;
    return st;
  }

  absl::StatusOr<ValuePtr> Call(const ValuePtr& fn, const ValuePtr& args) {
    if (fn->kind != Value::kGlobal || args->kind != Value::kTuple) {
      return Bad("REDUCE of something other than a global");
    }
    const std::string name = absl::StrCat(fn->s, ".", fn->s2);
    const std::vector<ValuePtr>& a = args->items;
    if (name == "collections.OrderedDict" && a.empty()) return Make(Value::kDict);
    if ((name == "torch._utils._rebuild_parameter" ||
         name == "torch._utils._rebuild_parameter_with_state") &&
        !a.empty() && a[0]->kind == Value::kTensor) {
      return a[0];
    }
    if (name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor") {
      if (a.size() < 4 || a[0]->kind != Value::kStorage || a[1]->kind != Value::kInt) {
        return Bad(absl::StrCat(name, ": unexpected arguments (a storage of an unknown kind?)"));
      }
      if (a[0]->s[0] == '?')
        return Bad(absl::StrCat("unsupported storage class ", a[0]->s.substr(1)));
      ValuePtr t = Make(Value::kTensor);
      t->items = {a[0]};
      t->offset = a[1]->i;
      absl::StatusOr<std::vector<int64_t>> size = IntTuple(a[2], "tensor size");
      if (!size.ok()) return Bad(size.status().message());
      absl::StatusOr<std::vector<int64_t>> stride = IntTuple(a[3], "tensor stride");
      if (!stride.ok()) return Bad(stride.status().message());
      t->size = *std::move(size);
      t->stride = *std::move(stride);
      return t;
    }
    return Bad(absl::StrCat("global ", name, " is not allowed (only state dicts of tensors)"));
  }

  const uint8_t* p_;
  uint64_t n_;
  uint64_t at_ = 0;
  std::string where_;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;
  std::map<uint64_t, ValuePtr> memo_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<TorchCheckpointFile>> TorchCheckpointFile::Open(
    const fs::path& path) {
  const std::string where = absl::StrCat("PyTorch checkpoint '", path.string(), "'");
  std::unique_ptr<TorchCheckpointFile> file(new TorchCheckpointFile());
  PHI_RETURN_IF_ERROR(file->Map(path, where, 22));  // 22: a ZIP's end record
  const auto* f = static_cast<const uint8_t*>(file->map_);
  absl::StatusOr<std::map<std::string, ZipEntry>> zip = ReadZip(f, file->map_size_, where);
  if (!zip.ok()) return zip.status();
  // The archive's one top-level folder holds data.pkl (its name varies by writer).
  std::string prefix;
  for (const auto& [name, e] : *zip) {
    if (name.size() >= 8 && name.compare(name.size() - 8, 8, "data.pkl") == 0 &&
        std::count(name.begin(), name.end(), '/') == 1) {
      if (!prefix.empty()) return absl::InvalidArgumentError(where + ": two data.pkl entries");
      prefix = name.substr(0, name.size() - 8);
    }
  }
  if (prefix.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": no <archive>/data.pkl entry"));
  }
  if (auto bo = zip->find(prefix + "byteorder"); bo != zip->end()) {
    const std::string order(reinterpret_cast<const char*>(f + bo->second.offset), bo->second.size);
    if (order != "little") {
      return absl::InvalidArgumentError(absl::StrCat(where, ": byte order '", order, "'"));
    }
  }
  const ZipEntry& pkl = zip->at(prefix + "data.pkl");
  absl::StatusOr<ValuePtr> root = Unpickler(f + pkl.offset, pkl.size, where).Run();
  if (!root.ok()) return root.status();
  if ((*root)->kind != Value::kDict) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": the pickled object is not a state dict {name: tensor}"));
  }
  for (const auto& [key, value] : (*root)->dict) {
    if (key->kind != Value::kStr) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": a state dict key is not a string"));
    }
    const std::string& name = key->s;
    if (value->kind != Value::kTensor) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": '", name, "' is not a tensor (a nested checkpoint? save the state dict)"));
    }
    const Value& st = *value->items[0];
    auto entry = zip->find(absl::StrCat(prefix, "data/", st.s2));
    if (entry == zip->end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": storage '", st.s2, "' of tensor '", name, "' is missing"));
    }
    const uint64_t elem = DtypeBytes(st.s);
    // Contiguous (row-major strides), inside its storage.
    const std::vector<int64_t>& size = value->size;
    if (value->stride.size() != size.size()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", name, "': bad stride"));
    }
    uint64_t numel = 1;
    bool contiguous = true;
    for (size_t d = size.size(); d-- > 0;) {
      if (size[d] != 1 && value->stride[d] != static_cast<int64_t>(numel)) contiguous = false;
      if (size[d] != 0 && numel > (uint64_t{1} << 62) / static_cast<uint64_t>(size[d])) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", name, "' too big"));
      }
      numel *= static_cast<uint64_t>(size[d]);
    }
    if (!contiguous && numel > 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": tensor '", name, "' is not contiguous (save tensor.contiguous())"));
    }
    // offset + numel elements within the storage's bytes (each step overflow-free: numel and
    // offset are first bounded by the entry size, elem <= 8).
    const uint64_t bytes = entry->second.size;
    const uint64_t off = static_cast<uint64_t>(value->offset);
    if (off > bytes / elem || numel > bytes / elem || off * elem + numel * elem > bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": tensor '", name, "' runs past its storage"));
    }
    const uint64_t begin = off * elem;
    if (file->tensors_.count(name) || file->unsupported_.count(name)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", name, "' twice"));
    }
    if (st.s != "F32" && st.s != "F16" && st.s != "BF16") {
      file->unsupported_.emplace(name, st.s);
      continue;
    }
    TensorView view;
    view.name = name;
    view.dtype = st.s == "F32" ? DType::kF32 : st.s == "F16" ? DType::kF16 : DType::kBF16;
    view.shape = size;
    view.data = reinterpret_cast<const std::byte*>(f + entry->second.offset + begin);
    view.nbytes = static_cast<size_t>(numel * elem);
    view.file = path.string();
    file->tensors_.emplace(name, std::move(view));
  }
  return file;
}

}  // namespace phishard
