// Every `grpcurl` command of README.md and docs/grpcurl.md, read out of the Markdown and performed
// against a real `phishard serve` the way grpcurl performs it: server reflection only (no
// generated header of ours), the -d JSON body turned into a DynamicMessage by the protobuf JSON
// parser, the answer printed back as JSON. Each command runs twice, once over the unix socket and
// once over TCP (`--listen-tcp`), whatever transport the docs show it on. The answers are checked
// against the JSON the docs show under a command, and against what each RPC must answer (SERVING,
// Info's model fields, Warmup's positive token count, ...). So the docs cannot drift from the
// server: a renamed method, a wrong field name in a body or a changed answer fails here.
#include <algorithm>
#include <cctype>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/integration/raw_grpc.h"
#include "tests/integration/reflection_client.h"
#include "tests/integration/shard_process.h"

namespace phishard {
namespace {

namespace gp = ::google::protobuf;
using integration::DemoShard;
using integration::RawServerStreamFirst;
using integration::RawUnary;
using integration::ReflectionClient;
using integration::TempDir;
using integration::TestDevice;
using integration::TestOnCuda;
using Json = nlohmann::json;

// The addresses the docs use; the test maps them to its own server.
constexpr char kDocSocketPrefix[] = "/tmp/lorax-server";
constexpr char kDocTcp[] = "127.0.0.1:50051";

struct DocCommand {
  std::string where;                  // "docs/grpcurl.md:57"
  std::vector<std::string> argv;      // shell words, variables expanded
  std::optional<std::string> expect;  // JSON the docs show as this command's answer
};

// ---- a small POSIX-shell reader: enough for the docs' command lines ---------------------------

// Splits `text` (a code block, or one inline command) into commands. Handles '...' (also across
// lines), "..." with $VAR, \-newline continuations, # comments, NAME='value' assignments and
// $NAME expansion. A comment holding a JSON object is the expected answer of the command before.
class ShellReader {
 public:
  ShellReader(std::string where, std::map<std::string, std::string>* vars,
              std::vector<DocCommand>* out)
      : where_(std::move(where)), vars_(vars), out_(out) {}

  void Read(const std::string& text, int first_line) {
    line_ = first_line;
    size_t i = 0;
    auto expand = [&](size_t* k) {  // at '$'
      size_t j = *k + 1;
      const bool braced = j < text.size() && text[j] == '{';
      if (braced) ++j;
      size_t e = j;
      while (e < text.size() &&
             (std::isalnum(static_cast<unsigned char>(text[e])) || text[e] == '_'))
        ++e;
      const std::string name = text.substr(j, e - j);
      if (braced) ++e;  // '}'
      *k = e;
      auto it = vars_->find(name);
      return it == vars_->end() ? std::string() : it->second;
    };
    while (i < text.size()) {
      const char c = text[i];
      if (c == '\n') {
        EndCommand();
        ++line_;
        ++i;
      } else if (c == ' ' || c == '\t') {
        EndWord();
        ++i;
      } else if (c == '#' && !in_word_) {
        size_t e = text.find('\n', i);
        if (e == std::string::npos) e = text.size();
        Comment(text.substr(i + 1, e - i - 1));
        i = e;
      } else if (c == '\\' && i + 1 < text.size() && text[i + 1] == '\n') {
        i += 2;
        ++line_;
      } else if (c == '\\' && i + 1 < text.size()) {
        Append(std::string(1, text[i + 1]));
        i += 2;
      } else if (c == '\'') {
        const size_t e = text.find('\'', i + 1);
        ASSERT_NE(e, std::string::npos) << where_ << ":" << line_ << ": unterminated '";
        const std::string quoted = text.substr(i + 1, e - i - 1);
        line_ += static_cast<int>(std::count(quoted.begin(), quoted.end(), '\n'));
        Append(quoted);
        i = e + 1;
      } else if (c == '"') {
        std::string quoted;
        size_t k = i + 1;
        while (k < text.size() && text[k] != '"') {
          if (text[k] == '\\' && k + 1 < text.size()) {
            quoted += text[k + 1];
            k += 2;
          } else if (text[k] == '$') {
            quoted += expand(&k);
          } else {
            if (text[k] == '\n') ++line_;
            quoted += text[k++];
          }
        }
        ASSERT_LT(k, text.size()) << where_ << ":" << line_ << ": unterminated \"";
        Append(quoted);
        i = k + 1;
      } else if (c == '$') {
        Append(expand(&i));
      } else if (c == ';' || c == '&' || c == '|') {
        EndCommand();
        ++i;
      } else {
        Append(std::string(1, c));
        ++i;
      }
    }
    EndCommand();
  }

 private:
  void Append(const std::string& s) {
    if (!in_word_) start_line_ = words_.empty() ? line_ : start_line_;
    word_ += s;
    in_word_ = true;
  }
  void EndWord() {
    if (in_word_) words_.push_back(word_);
    word_.clear();
    in_word_ = false;
  }
  void EndCommand() {
    EndWord();
    if (words_.empty()) return;
    static const std::regex kAssign("([A-Za-z_][A-Za-z0-9_]*)=([\\s\\S]*)");
    std::smatch m;
    if (words_.size() == 1 && std::regex_match(words_[0], m, kAssign)) {
      (*vars_)[m[1]] = m[2];
    } else if (words_[0] == "grpcurl") {
      out_->push_back({where_ + ":" + std::to_string(start_line_), words_, std::nullopt});
    }
    words_.clear();
  }
  void Comment(const std::string& text) {
    const size_t b = text.find_first_not_of(" \t");
    if (b == std::string::npos || text[b] != '{') return;
    EndCommand();  // `cmd   # {...}` on one line: the comment answers that command
    ASSERT_FALSE(out_->empty()) << where_ << ":" << line_ << ": an answer before any command";
    out_->back().expect = text.substr(b);
  }

  std::string where_;
  std::map<std::string, std::string>* vars_;
  std::vector<DocCommand>* out_;
  std::vector<std::string> words_;
  std::string word_;
  bool in_word_ = false;
  int line_ = 0;
  int start_line_ = 0;
};

// Every grpcurl command of a Markdown file, in document order: those in fenced shell blocks and
// those in inline `grpcurl ...` code spans (tables, prose). A ```json block right after a block
// of commands is the answer of its last command.
std::vector<DocCommand> ReadDoc(const std::string& rel) {
  const std::string text = integration::ReadFile(std::string(PHISHARD_MODELS) + "/../" + rel);
  EXPECT_FALSE(text.empty()) << rel;
  std::vector<DocCommand> out;
  std::map<std::string, std::string> vars;
  std::vector<std::string> lines;
  for (size_t b = 0, e; b <= text.size(); b = e + 1) {
    e = text.find('\n', b);
    if (e == std::string::npos) e = text.size();
    lines.push_back(text.substr(b, e - b));
  }
  static const std::regex kInline("`(grpcurl [^`]*)`");
  for (size_t n = 0; n < lines.size(); ++n) {
    if (lines[n].rfind("```", 0) == 0) {
      const std::string lang = lines[n].substr(3);
      std::string block;
      const size_t first = n + 1;
      for (++n; n < lines.size() && lines[n].rfind("```", 0) != 0; ++n) block += lines[n] + "\n";
      if (lang == "json") {
        if (!out.empty() && !out.back().expect) out.back().expect = block;
      } else if (lang.empty() || lang == "sh" || lang == "bash" || lang == "console") {
        ShellReader(rel, &vars, &out).Read(block, static_cast<int>(first) + 1);
      }
      continue;
    }
    for (std::sregex_iterator it(lines[n].begin(), lines[n].end(), kInline), end; it != end; ++it) {
      ShellReader(rel, &vars, &out).Read((*it)[1].str(), static_cast<int>(n) + 1);
    }
  }
  return out;
}

// ---- performing one command ---------------------------------------------------------------------

struct Parsed {
  bool plaintext = false;
  bool unix_socket = false;
  std::optional<std::string> data;
  std::string address;
  std::vector<std::string> rest;  // list [SYM] | describe [SYM] | SERVICE/METHOD
};

Parsed ParseGrpcurl(const DocCommand& c) {
  Parsed p;
  std::vector<std::string> positional;
  for (size_t i = 1; i < c.argv.size(); ++i) {
    const std::string& a = c.argv[i];
    if (a == "-plaintext") {
      p.plaintext = true;
    } else if (a == "-unix") {
      p.unix_socket = true;
    } else if (a == "-d" && i + 1 < c.argv.size()) {
      p.data = c.argv[++i];
    } else if (!a.empty() && a[0] == '-') {
      ADD_FAILURE() << c.where << ": grpcurl flag " << a << " is not understood by this test";
    } else {
      positional.push_back(a);
    }
  }
  if (!positional.empty()) {
    p.address = positional[0];
    p.rest.assign(positional.begin() + 1, positional.end());
  }
  return p;
}

// The server the commands are sent to, over one transport.
struct Target {
  std::string name;           // "unix" | "tcp"
  std::string channel;        // gRPC target
  std::string socket_prefix;  // what /tmp/lorax-server stands for in answers
};

std::string Replace(std::string s, const std::string& from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
    s.replace(at, from.size(), to);
  return s;
}

// `expected` (the docs' JSON) must be part of `actual`: every key the docs show, with its value;
// objects recursively, arrays element by element. The one number that depends on the machine
// (the KV pool's size) only has to be a positive multiple of the block size.
void ExpectJsonSubset(const Json& expected, const Json& actual, const std::string& path,
                      const std::string& where) {
  if (expected.is_object()) {
    ASSERT_TRUE(actual.is_object()) << where << ": " << path << " is " << actual.dump();
    for (const auto& [k, v] : expected.items()) {
      ASSERT_TRUE(actual.contains(k))
          << where << ": the answer has no " << path << "/" << k << ": " << actual.dump();
      ExpectJsonSubset(v, actual[k], path + "/" + k, where);
    }
  } else if (expected.is_array()) {
    ASSERT_TRUE(actual.is_array() && actual.size() == expected.size())
        << where << ": " << path << " is " << actual.dump() << ", the docs show "
        << expected.dump();
    for (size_t i = 0; i < expected.size(); ++i)
      ExpectJsonSubset(expected[i], actual[i], path + "/" + std::to_string(i), where);
  } else if (TestOnCuda() && (path == "/dtype" || path == "/deviceType")) {
    // The docs show the demo model's CPU answer; a CUDA shard answers for its own device.
    EXPECT_EQ(actual, path == "/dtype" ? "torch.bfloat16" : "cuda") << where << ": " << path;
  } else if (path == "/maxSupportedTotalTokens") {
    ASSERT_TRUE(actual.is_number_unsigned()) << where << ": " << actual.dump();
    EXPECT_GT(actual.get<uint64_t>(), 0u) << where;
    EXPECT_EQ(actual.get<uint64_t>() % 16, 0u) << where;
  } else {
    EXPECT_EQ(actual, expected) << where << ": " << path;
  }
}

class GrpcurlRunner {
 public:
  GrpcurlRunner(const Target& t, std::string doc_socket_prefix)
      : target_(t),
        doc_prefix_(std::move(doc_socket_prefix)),
        channel_(grpc::CreateChannel(t.channel, grpc::InsecureChannelCredentials())),
        rc_(channel_) {}

  // Performs `c` on this runner's transport; returns the method it called ("list", "describe" or
  // "pkg.Service/Method").
  std::string Run(const DocCommand& c) {
    SCOPED_TRACE(c.where + " over " + target_.name);
    const Parsed p = ParseGrpcurl(c);
    EXPECT_TRUE(p.plaintext) << c.where << ": without -plaintext grpcurl tries TLS and fails";
    if (p.unix_socket) {
      EXPECT_EQ(p.address.rfind(doc_prefix_ + "-", 0), 0u)
          << c.where << ": -unix address " << p.address << " is not a socket of the docs' server";
    } else {
      EXPECT_EQ(p.address, kDocTcp) << c.where << ": unknown TCP address";
    }
    if (p.rest.empty()) {
      ADD_FAILURE() << c.where << ": no verb or method";
      return "";
    }
    const std::string& verb = p.rest[0];
    if (verb == "list") {
      List(p.rest.size() > 1 ? p.rest[1] : "", c.where);
      return "list";
    }
    if (verb == "describe") {
      EXPECT_EQ(p.rest.size(), 2u) << c.where << ": describe needs a symbol";
      if (p.rest.size() == 2) Describe(p.rest[1], c.where);
      return "describe";
    }
    Call(verb, p.data.value_or("{}"), c);
    return verb;
  }

 private:
  void List(const std::string& service, const std::string& where) {
    if (service.empty()) {
      const std::vector<std::string> got = rc_.ListServices();
      const std::set<std::string> names(got.begin(), got.end());
      for (const char* s : {"generate.v1.LoraxService", "grpc.health.v1.Health",
                            "grpc.reflection.v1alpha.ServerReflection"}) {
        EXPECT_TRUE(names.count(s)) << where << ": list lacks " << s;
      }
      return;
    }
    ASSERT_TRUE(rc_.LoadSymbol(service)) << where << ": reflection does not know " << service;
    const gp::ServiceDescriptor* sd = rc_.pool().FindServiceByName(service);
    ASSERT_NE(sd, nullptr) << where << ": " << service << " is not a service";
    std::set<std::string> methods;
    for (int i = 0; i < sd->method_count(); ++i) methods.insert(sd->method(i)->name());
    if (service == "generate.v1.LoraxService") {
      for (const char* m :
           {"Info", "ServiceDiscovery", "Health", "Warmup", "Prefill", "Decode", "FilterBatch",
            "ClearCache", "DownloadAdapter", "LoadAdapter", "OffloadAdapter"}) {
        EXPECT_TRUE(methods.count(m)) << where << ": " << service << " lists no " << m;
      }
    }
  }

  void Describe(std::string symbol, const std::string& where) {
    if (!symbol.empty() && symbol[0] == '.') symbol = symbol.substr(1);  // grpcurl accepts both
    ASSERT_TRUE(rc_.LoadSymbol(symbol)) << where << ": reflection does not know " << symbol;
    if (const gp::ServiceDescriptor* s = rc_.pool().FindServiceByName(symbol)) {
      EXPECT_GT(s->method_count(), 0) << where;
    } else {
      const gp::Descriptor* d = rc_.pool().FindMessageTypeByName(symbol);
      ASSERT_NE(d, nullptr) << where;
      EXPECT_GT(d->field_count(), 0) << where << ": " << symbol << " described with no fields";
    }
  }

  void Call(const std::string& full, const std::string& body, const DocCommand& c) {
    const size_t slash = full.find_last_of("/.");
    ASSERT_NE(slash, std::string::npos) << c.where << ": not SERVICE/METHOD: " << full;
    const std::string service = full.substr(0, slash), method = full.substr(slash + 1);
    ASSERT_TRUE(rc_.LoadSymbol(service)) << c.where << ": reflection does not know " << service;
    const gp::ServiceDescriptor* sd = rc_.pool().FindServiceByName(service);
    ASSERT_NE(sd, nullptr) << c.where;
    const gp::MethodDescriptor* md = sd->FindMethodByName(method);
    ASSERT_NE(md, nullptr) << c.where << ": " << service << " has no method " << method;

    std::unique_ptr<gp::Message> req = rc_.New(md->input_type()->full_name());
    gp::util::JsonParseOptions jopt;  // grpcurl refuses unknown fields as well
    const auto parsed = gp::util::JsonStringToMessage(body, req.get(), jopt);
    ASSERT_TRUE(parsed.ok()) << c.where << ": the -d body is not a valid "
                             << md->input_type()->full_name() << ": " << parsed.ToString();
    std::string bytes;
    const std::string path = "/" + service + "/" + method;
    const grpc::Status st =
        md->server_streaming()
            ? RawServerStreamFirst(channel_, path, req->SerializeAsString(), &bytes)
            : RawUnary(channel_, path, req->SerializeAsString(), &bytes);
    ASSERT_TRUE(st.ok()) << c.where << ": " << full << " failed: " << st.error_message();
    std::unique_ptr<gp::Message> resp = rc_.New(md->output_type()->full_name());
    ASSERT_TRUE(resp->ParseFromString(bytes)) << c.where;
    std::string text;  // as grpcurl prints it: lowerCamelCase, defaults left out
    ASSERT_TRUE(gp::util::MessageToJsonString(*resp, &text).ok());
    const Json answer = Json::parse(text);

    if (c.expect) {
      const Json want =
          Json::parse(Replace(*c.expect, kDocSocketPrefix, target_.socket_prefix), nullptr, false);
      ASSERT_FALSE(want.is_discarded())
          << c.where << ": the answer shown is not JSON: " << *c.expect;
      ExpectJsonSubset(want, answer, "", c.where);
    }
    CheckAnswer(full, answer, c.where);
  }

  // What each RPC must answer, whatever the docs show.
  void CheckAnswer(const std::string& rpc, const Json& a, const std::string& where) {
    if (rpc == "grpc.health.v1.Health/Check" || rpc == "grpc.health.v1.Health/Watch") {
      EXPECT_EQ(a.value("status", ""), "SERVING") << where << ": " << a.dump();
    } else if (rpc == "generate.v1.LoraxService/Info") {
      // The demo model: float32 on the CPU, bf16 on CUDA (DeviceArgs()).
      EXPECT_EQ(a.value("dtype", ""), TestOnCuda() ? "torch.bfloat16" : "torch.float32") << where;
      EXPECT_EQ(a.value("deviceType", ""), TestDevice()) << where;
      EXPECT_EQ(a.value("blockSize", 0), 16) << where;
      EXPECT_TRUE(a.value("supportsGeneration", false)) << where;
      EXPECT_TRUE(a.value("requiresBlockAllocator", false)) << where;
    } else if (rpc == "generate.v1.LoraxService/ServiceDiscovery") {
      EXPECT_EQ(a.value("urls", Json::array()),
                Json::array({"unix://" + target_.socket_prefix + "-0"}))
          << where;
    } else if (rpc == "generate.v1.LoraxService/Warmup") {
      EXPECT_GT(a.value("maxSupportedTotalTokens", 0u), 0u) << where << ": " << a.dump();
    } else if (rpc == "generate.v1.LoraxService/Prefill") {
      ASSERT_TRUE(a.contains("generations")) << where << ": " << a.dump();
      for (const Json& g : a["generations"]) {
        EXPECT_FALSE(g.value("nextTokens", Json::object()).value("ids", Json::array()).empty())
            << where << ": " << g.dump();
      }
      EXPECT_TRUE(a.contains("batch")) << where << ": a batch that goes on is returned";
    }
  }

  Target target_;
  std::string doc_prefix_;
  std::shared_ptr<grpc::Channel> channel_;
  ReflectionClient rc_;
};

TEST(GrpcurlDocs, EveryDocumentedCommandWorksOverUnixSocketAndTcp) {
  std::vector<DocCommand> commands;
  for (const char* doc : {"README.md", "docs/grpcurl.md"}) {
    std::vector<DocCommand> c = ReadDoc(doc);
    EXPECT_FALSE(c.empty()) << doc << " shows no grpcurl command";
    commands.insert(commands.end(), c.begin(), c.end());
  }
  ASSERT_FALSE(HasFailure());

  TempDir dir;
  DemoShard shard(dir, {"--listen-tcp", "0"},
                  {{"WORLD_SIZE", ""},
                   {"RANK", ""},
                   {"PHISHARD_LISTEN_TCP", ""},
                   {"PHISHARD_UDS_PATH", ""},
                   {"PHISHARD_MAX_KV_BLOCKS", ""}});
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  const std::string port = shard.process->WaitForStdout(std::regex("and 127\\.0\\.0\\.1:([0-9]+)"));
  ASSERT_FALSE(port.empty()) << shard.process->Logs();

  const std::vector<Target> targets = {
      {"unix", "unix:" + shard.socket, shard.uds},
      {"tcp", "127.0.0.1:" + port, shard.uds},
  };
  std::set<std::string> called;
  bool doc_unix = false, doc_tcp = false;
  for (const Target& t : targets) {
    GrpcurlRunner runner(t, kDocSocketPrefix);
    for (const DocCommand& c : commands) {
      called.insert(runner.Run(c));
      const bool unix_socket = ParseGrpcurl(c).unix_socket;
      doc_unix |= unix_socket;
      doc_tcp |= !unix_socket;
      if (HasFatalFailure()) return;
    }
  }
  // What the docs must keep showing (issue 7: list, describe, both healths, Info, Warmup).
  for (const char* must :
       {"list", "describe", "grpc.health.v1.Health/Check", "generate.v1.LoraxService/Health",
        "generate.v1.LoraxService/Info", "generate.v1.LoraxService/ServiceDiscovery",
        "generate.v1.LoraxService/Warmup"}) {
    EXPECT_TRUE(called.count(must)) << "the docs no longer show " << must;
  }
  EXPECT_TRUE(doc_unix && doc_tcp) << "the docs must show both transports";
}

// The reader itself: a continuation, a quoted body across lines, a variable, an inline answer.
TEST(GrpcurlDocs, ShellReaderSplitsLikeAShell) {
  std::vector<DocCommand> out;
  std::map<std::string, std::string> vars;
  ShellReader r("t", &vars, &out);
  r.Read(
      "B='{\n  \"a\": 1}'\n"
      "grpcurl -plaintext -unix -d \"$B\" \\\n  /tmp/x-0 s.S/M   # {\"k\": \"v\"}\n"
      "grpcurl -plaintext -d '{\"x\": \"it''s\"}' h:1 s.S/N & echo no\n"
      "$B/phishard serve m\n",
      10);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].argv, (std::vector<std::string>{"grpcurl", "-plaintext", "-unix", "-d",
                                                   "{\n  \"a\": 1}", "/tmp/x-0", "s.S/M"}));
  EXPECT_EQ(out[0].where, "t:12");
  EXPECT_EQ(out[0].expect.value_or(""), "{\"k\": \"v\"}");
  EXPECT_EQ(out[1].argv[3], "{\"x\": \"its\"}");
  EXPECT_FALSE(out[1].expect.has_value());
}

}  // namespace
}  // namespace phishard
