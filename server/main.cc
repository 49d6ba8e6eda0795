// phishard / lorax-server: one binary for the shard (`serve`), the launcher's
// `download-weights`, and the local tools (`tokenize`, `generate`, `client`).
#include "server/cli.h"

int main(int argc, char** argv) { return phishard::RunCli(argc, argv); }
