// gRPC core's own log lines (a port that cannot be bound, transport errors) routed through
// common/logging: with --json-output they become launcher JSON lines carrying the rank like every
// other line, instead of gRPC's `E1128 18:52:20.88 12332 chttp2_server.cc:1045] ...` on stderr.
// gRPC still filters by GRPC_VERBOSITY (default ERROR) before a line gets here.
#pragma once

namespace phishard {

void RouteGrpcLogsToPhiLog();

}  // namespace phishard
