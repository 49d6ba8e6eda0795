#include "server/grpc_log_sink.h"

#include <string>

#include "common/logging.h"
#include "grpc/support/log.h"

namespace phishard {
namespace {

void GrpcLogSink(gpr_log_func_args* args) {
  LogLevel level = LogLevel::kError;
  if (args->severity == GPR_LOG_SEVERITY_DEBUG) level = LogLevel::kDebug;
  if (args->severity == GPR_LOG_SEVERITY_INFO) level = LogLevel::kInfo;
  const char* base = args->file != nullptr ? args->file : "?";
  for (const char* p = base; *p != '\0'; ++p) {
    if (*p == '/') base = p + 1;
  }
  Log(level, std::string("grpc ") + base + ":" + std::to_string(args->line) + ": " +
                 (args->message != nullptr ? args->message : ""));
}

}  // namespace

void RouteGrpcLogsToPhiLog() { gpr_set_log_function(&GrpcLogSink); }

}  // namespace phishard
