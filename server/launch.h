// `phishard launch --num-shard N [serve flags...]`: the part of the LoRAX launcher that runs the
// shards (spec §1.1 steps 2-5), for a pod that runs the router next to it. It starts N
// `phishard serve --sharded` rank processes of this binary with RANK, WORLD_SIZE, MASTER_ADDR and
// MASTER_PORT (a free port unless given), each in its own process group and killed with the
// launcher (PR_SET_PDEATHSIG); waits until every socket `{uds-path}-{rank}` exists; forwards
// SIGTERM/SIGINT to the ranks. Exit status: 0 after a shutdown it was asked for in which every
// rank exited 0; 1 when any rank exits on its own (the others are then stopped: SIGTERM, SIGKILL
// after --stop-timeout-s) or does not stop in time; 2 for bad options.
#pragma once

#include <string>
#include <vector>

namespace phishard {

struct LaunchOptions {
  int num_shard = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;                         // 0 = a port free at launch time
  std::string uds_path = "/tmp/lorax-server";  // socket prefix, passed to every rank
  double ready_timeout_s = 0;                  // > 0: fail if the sockets are not up in time
  double stop_timeout_s = 60;                  // SIGTERM -> SIGKILL of the ranks
  std::vector<std::string> serve_args;         // MODEL_ID and every other `serve` flag
  std::string binary;                          // "" = this executable (/proc/self/exe)
};

int RunLaunch(const LaunchOptions& options);

}  // namespace phishard
