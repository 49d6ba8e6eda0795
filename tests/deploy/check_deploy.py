#!/usr/bin/env python3
"""Offline validation of deploy/ and the user docs, run by CTest (label `deploy`):

    python3 tests/deploy/check_deploy.py --bin build/bin/phishard [unittest options]

- lint: yamllint --strict on every manifest; `bash -n` on the helper scripts;
- kustomize: base and every overlay build (kubectl kustomize when its kustomize is v4 or newer,
  else tests/deploy/kustomize_lite.py; where both exist, their outputs must be identical);
- objects: the fields a working pod needs (probes on the right ports, GPU limits, shared socket
  directory, /dev/shm, model cache volume and HUGGINGFACE_HUB_CACHE, grace period longer than the
  drain, non-root, every phishard flag and PHISHARD_* variable one the binary really has);
- Dockerfile: stages and COPY --from references, every COPY source sent by the dockerignore,
  build packages = scripts/install-deps.sh, non-root runtime stages, runtime package list;
- docs: docs/flags.md lists exactly the flags and env twins of `phishard --help-all` and every
  environment variable the code reads; every phishard flag in a docs command line exists;
- scripts: lorax-router-wait and phishard-prestop against a real `phishard serve` (tiny model).
Needs python3-yaml and yamllint (scripts/install-deps.sh). Runs in a few seconds.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

try:
    import yaml
except ImportError:  # a python3 without PyYAML ahead of Debian's on PATH
    if sys.executable != "/usr/bin/python3" and os.path.exists("/usr/bin/python3"):
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    sys.exit("check_deploy: PyYAML is missing (apt-get install python3-yaml)")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dockerfile_lint  # noqa: E402
import kustomize_lite  # noqa: E402
from scripts_check import ScriptsTest  # noqa: E402,F401  (collected by unittest)
import scripts_check  # noqa: E402

REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
K8S = os.path.join(REPO, "deploy", "k8s")
DOCKERFILE = os.path.join(REPO, "deploy", "Dockerfile")
BIN = None  # set from --bin
_CACHE = {}


def repo_path(*parts):
    return os.path.join(REPO, *parts)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---- the binary's command line ------------------------------------------------------------------

def phishard_cli():
    """{subcommand: {"flags": set of --names, "envs": set of env twins}} from --help-all."""
    if "cli" in _CACHE:
        return _CACHE["cli"]
    if not BIN or not os.access(BIN, os.X_OK):
        raise AssertionError(f"phishard binary '{BIN}' not found: build the `phishard` target")
    out = subprocess.run([BIN, "--help-all"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    cli, sub, in_subs = {}, None, False
    for line in out.splitlines():
        if line.startswith("Subcommands:"):
            in_subs = True
            continue
        if in_subs and re.fullmatch(r"[a-z][a-z0-9-]*", line):
            sub = line
            cli[sub] = {"flags": set(), "envs": set()}
            continue
        if sub is None:
            continue
        m = re.match(r"\s{4}(-\S+)", line)
        if m:
            for name in m.group(1).split(","):
                name = re.sub(r"\{.*\}$", "", name)
                if name.startswith("--"):
                    cli[sub]["flags"].add(name)
        cli[sub]["envs"].update(re.findall(r"\(Env:([A-Z0-9_]+)\)", line))
    if "serve" not in cli:
        raise AssertionError(f"could not read the subcommands of `{BIN} --help-all`:\n{out}")
    _CACHE["cli"] = cli
    return cli


def all_env_twins():
    return set().union(*(v["envs"] for v in phishard_cli().values()))


def code_env_vars():
    """Environment variables the C++ code reads (getenv and the env helpers in cli.cc et al.)."""
    names = set()
    pat = re.compile(r'(?:getenv|[Ee]nv|ParseEnvDouble|ParseEnvInt|EnvIsOne|ReadIntEnv)'
                     r'\((?:env, )?"([A-Z][A-Z0-9_]+)"')
    for folder in ("server", "model", "parallel", "common"):
        for root, _, files in os.walk(repo_path(folder)):
            for f in files:
                if f.endswith((".cc", ".h")):
                    text = read(os.path.join(root, f))
                    names.update(pat.findall(text))
                    for group in re.findall(r"for \(const char\* \w+ : \{([^}]*)\}", text):
                        names.update(re.findall(r'"([A-Z][A-Z0-9_]+)"', group))
    return names


# ---- kustomize ----------------------------------------------------------------------------------

def kustomize_dirs():
    dirs = [os.path.join(K8S, "base")]
    overlays = os.path.join(K8S, "overlays")
    dirs += sorted(os.path.join(overlays, d) for d in os.listdir(overlays)
                   if os.path.isfile(os.path.join(overlays, d, "kustomization.yaml")))
    return dirs


def kubectl_kustomize_ok():
    """True when a kubectl with kustomize >= v4 (the `patches` field) is on PATH."""
    if "kubectl" not in _CACHE:
        ok = False
        if shutil.which("kubectl"):
            r = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True,
                               timeout=30)
            m = re.search(r"Kustomize Version: v(\d+)", r.stdout)
            ok = bool(m) and int(m.group(1)) >= 4
        _CACHE["kubectl"] = ok
    return _CACHE["kubectl"]


def build(directory):
    """Objects of the kustomization, keyed by (kind, name)."""
    key = ("build", directory)
    if key not in _CACHE:
        if kubectl_kustomize_ok():
            r = subprocess.run(["kubectl", "kustomize", directory], capture_output=True, text=True,
                               timeout=60)
            if r.returncode != 0:
                raise AssertionError(f"kubectl kustomize {directory} failed:\n{r.stderr}")
            objs = [d for d in yaml.safe_load_all(r.stdout) if d]
        else:
            objs = kustomize_lite.build(directory)
        _CACHE[key] = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    return _CACHE[key]


def expected_gpus(directory):
    m = re.fullmatch(r"gpu(\d+)", os.path.basename(directory))
    return int(m.group(1)) if m else 1


def quantity(q):
    """Kubernetes quantity -> bytes (binary and decimal suffixes)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(q))
    if not m:
        raise AssertionError(f"not a quantity: {q!r}")
    mult = {None: 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * mult


def container_env(obj, container, objs):
    """A container's environment: envFrom ConfigMaps of the build, then env."""
    env = {}
    for src in container.get("envFrom", []):
        name = src["configMapRef"]["name"]
        cm = objs.get(("ConfigMap", name))
        if cm is None:
            raise AssertionError(f"{container['name']}: envFrom ConfigMap {name} not in the build")
        env.update(cm.get("data", {}))
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", "")
    return env


def flag_value(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


class LintTest(unittest.TestCase):
    def test_yamllint_strict(self):
        exe = shutil.which("yamllint")
        self.assertIsNotNone(exe, "yamllint not installed (scripts/install-deps.sh installs it)")
        r = subprocess.run([exe, "--strict", "-c", repo_path("deploy", "yamllint.yaml"), K8S],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, f"yamllint:\n{r.stdout}{r.stderr}")

    def test_scripts_parse_and_are_executable(self):
        for folder in ("bin", "scripts"):
            for f in sorted(os.listdir(repo_path("deploy", folder))):
                path = repo_path("deploy", folder, f)
                with self.subTest(script=path):
                    self.assertTrue(os.access(path, os.X_OK), f"{path} is not executable")
                    r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
                    self.assertEqual(r.returncode, 0, r.stderr)


class KustomizeTest(unittest.TestCase):
    def test_every_overlay_builds(self):
        dirs = kustomize_dirs()
        self.assertGreaterEqual(len(dirs), 3, "base + overlays gpu1 and gpu2 expected")
        for d in dirs:
            with self.subTest(kustomization=d):
                self.assertIn(("StatefulSet", "phishard"), build(d))

    def test_fallback_builder_matches_kubectl(self):
        if not kubectl_kustomize_ok():
            self.skipTest("no kubectl with kustomize >= v4 to compare kustomize_lite with")
        for d in kustomize_dirs():
            with self.subTest(kustomization=d):
                lite = {(o["kind"], o["metadata"]["name"]): o for o in kustomize_lite.build(d)}
                self.assertEqual(lite, build(d))

    def test_fallback_builder_refuses_what_it_does_not_know(self):
        with self.assertRaises(kustomize_lite.KustomizeError):
            kustomize_lite.apply_json_patch({"a": [1]}, [{"op": "test", "path": "/a/0",
                                                          "value": 2}])
        with self.assertRaises(kustomize_lite.KustomizeError):
            kustomize_lite.apply_json_patch({"a": 1}, [{"op": "move", "path": "/a"}])


class ObjectsTest(unittest.TestCase):
    """The fields a working pod needs, in base and every overlay."""

    def each_build(self):
        for d in kustomize_dirs():
            objs = build(d)
            sts = objs[("StatefulSet", "phishard")]
            pod = sts["spec"]["template"]["spec"]
            containers = {c["name"]: c for c in pod["containers"]}
            yield d, objs, sts, pod, containers

    def test_selectors_and_services(self):
        for d, objs, sts, pod, _ in self.each_build():
            with self.subTest(kustomization=d):
                labels = sts["spec"]["template"]["metadata"]["labels"]
                sel = sts["spec"]["selector"]["matchLabels"]
                self.assertLessEqual(sel.items(), labels.items())
                headless = objs.get(("Service", sts["spec"]["serviceName"]))
                self.assertIsNotNone(headless, "serviceName must name a Service of the build")
                self.assertEqual(headless["spec"].get("clusterIP"), "None")
                svc = objs[("Service", "phishard")]
                self.assertLessEqual(svc["spec"]["selector"].items(), labels.items())
                router_ports = {p["name"]: p["containerPort"] for c in pod["containers"]
                                if c["name"] == "router" for p in c["ports"]}
                (port,) = svc["spec"]["ports"]
                self.assertEqual(port["port"], 80)
                self.assertIn(port["targetPort"], router_ports)
                np = objs[("NetworkPolicy", "phishard")]
                self.assertLessEqual(np["spec"]["podSelector"]["matchLabels"].items(),
                                     labels.items())
                allowed = [p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]]
                self.assertEqual(allowed, ["http"], "only the router's port may be reachable")

    def test_pod_security_and_grace(self):
        for d, objs, sts, pod, containers in self.each_build():
            with self.subTest(kustomization=d):
                sc = pod["securityContext"]
                self.assertTrue(sc["runAsNonRoot"])
                self.assertEqual(sc["runAsUser"], 10001, "the image's USER (deploy/Dockerfile)")
                self.assertEqual(sc["fsGroup"], 10001)
                self.assertIs(pod["enableServiceLinks"], False,
                              "service links inject PHISHARD_* variables")
                env = container_env(sts, containers["shard"], objs)
                drain = float(env.get("PRESTOP_TIMEOUT_S", 80)) + float(
                    env.get("PHISHARD_SHUTDOWN_GRACE_S", 30))
                self.assertGreater(pod["terminationGracePeriodSeconds"], drain)
                for c in containers.values():
                    self.assertFalse(c["securityContext"]["allowPrivilegeEscalation"])

    def test_shard_container(self):
        cli = phishard_cli()
        for d, objs, sts, pod, containers in self.each_build():
            with self.subTest(kustomization=d):
                self.assertEqual(list(containers)[0], "shard", "overlay patches index it as 0")
                shard = containers["shard"]
                cmd, args = shard["command"], shard["args"]
                self.assertEqual(cmd[0], "phishard")
                sub = cmd[1]
                self.assertIn(sub, cli, f"`phishard {sub}` does not exist in {BIN}")
                # `launch` passes every flag it does not know to each `serve` rank.
                known = cli[sub]["flags"] | (cli["serve"]["flags"] if sub == "launch" else set())
                for a in args:
                    if a.startswith("--"):
                        self.assertIn(a.split("=")[0], known, f"`phishard {sub}` has no flag {a}")
                gpus = expected_gpus(d)
                lim = shard["resources"]["limits"]
                self.assertEqual(int(lim["nvidia.com/gpu"]), gpus)
                req = shard["resources"].get("requests", {})
                if "nvidia.com/gpu" in req:
                    self.assertEqual(req["nvidia.com/gpu"], lim["nvidia.com/gpu"])
                if gpus > 1:
                    self.assertEqual(sub, "launch")
                    self.assertEqual(flag_value(args, "--num-shard"), str(gpus))
                env = container_env(sts, shard, objs)
                listen = flag_value(args, "--listen-tcp") or env.get("PHISHARD_LISTEN_TCP")
                ranks = int(flag_value(args, "--num-shard") or 1) if sub == "launch" else 1
                if listen is not None and ranks > 1:
                    # Rank r of `launch` listens on PORT + r (server/cli.cc, RankTcpAddress).
                    base = int(listen.rsplit(":", 1)[-1])
                    declared = [q["containerPort"] for q in shard.get("ports", [])]
                    for r in range(ranks):
                        self.assertIn(base + r, declared, f"rank {r} listens on {base + r}")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    p = shard[probe]
                    if "grpc" in p:
                        # The kubelet dials the pod IP: --listen-tcp on every interface; the
                        # port given is rank 0's.
                        self.assertIsNotNone(listen, f"{probe}: gRPC probe without --listen-tcp")
                        host, port = listen.rsplit(":", 1)
                        self.assertEqual(host, "0.0.0.0", "the kubelet dials the pod IP")
                        self.assertEqual(p["grpc"]["port"], int(port), probe)
                        self.assertIn(int(port), [q["containerPort"] for q in shard["ports"]])
                    else:
                        # Over the unix socket, the way the router dials the shards.
                        probe_cmd = p["exec"]["command"]
                        self.assertEqual(probe_cmd[:3], ["phishard", "client", "health"], probe)
                        for a in probe_cmd[3:]:
                            if a.startswith("--"):
                                self.assertIn(a, cli["client"]["flags"], probe)
                        self.assertTrue("--uds-path" in probe_cmd or "PHISHARD_UDS_PATH" in env)
                self.assertEqual(shard["lifecycle"]["preStop"]["exec"]["command"],
                                 ["phishard-prestop"])
                self.assertEqual(env.get("NUM_SHARD", "1"), str(gpus))
                for name in env:
                    if name.startswith("PHISHARD_"):
                        self.assertIn(name, all_env_twins(), f"{BIN} reads no {name}")

    def test_volumes(self):
        for d, objs, sts, pod, containers in self.each_build():
            with self.subTest(kustomization=d):
                vols = {v["name"]: v for v in pod["volumes"]}
                mounts = {c: {m["mountPath"]: m for m in containers[c]["volumeMounts"]}
                          for c in containers}
                shard_env = container_env(sts, containers["shard"], objs)
                router_env = container_env(sts, containers["router"], objs)
                # One socket directory: an emptyDir both containers mount where the prefix points.
                uds = shard_env["PHISHARD_UDS_PATH"]
                self.assertEqual(router_env["PHISHARD_UDS_PATH"], uds)
                sock_dir = os.path.dirname(uds)
                names = {mounts[c][sock_dir]["name"] for c in ("shard", "router")}
                self.assertEqual(len(names), 1)
                self.assertIn("emptyDir", vols[names.pop()])
                # /dev/shm: memory-backed and big enough for NCCL with more than one GPU.
                shm = vols[mounts["shard"]["/dev/shm"]["name"]]["emptyDir"]
                self.assertEqual(shm["medium"], "Memory")
                self.assertGreaterEqual(quantity(shm["sizeLimit"]),
                                        2**30 if expected_gpus(d) == 1 else 4 * 2**30)
                # The model cache: HUGGINGFACE_HUB_CACHE lies on a read-only PVC/hostPath mount.
                cache = shard_env["HUGGINGFACE_HUB_CACHE"]
                for c in ("shard", "router"):
                    m = [m for p, m in mounts[c].items()
                         if cache == p or cache.startswith(p.rstrip("/") + "/")]
                    self.assertTrue(m, f"{c}: HUGGINGFACE_HUB_CACHE={cache} is on no mount")
                    self.assertTrue(m[0].get("readOnly"))
                    vol = vols[m[0]["name"]]
                    self.assertTrue("persistentVolumeClaim" in vol or "hostPath" in vol)
                    if "persistentVolumeClaim" in vol:
                        self.assertIn(("PersistentVolumeClaim",
                                       vol["persistentVolumeClaim"]["claimName"]), objs)
                self.assertIn("/adapters", mounts["shard"])

    def test_router_container(self):
        for d, objs, sts, pod, containers in self.each_build():
            with self.subTest(kustomization=d):
                router = containers["router"]
                self.assertEqual(router["command"], ["lorax-router-wait"])
                args = router["args"]
                ports = {p["name"]: p["containerPort"] for p in router["ports"]}
                self.assertEqual(int(flag_value(args, "--port")), ports["http"])
                self.assertEqual(flag_value(args, "--hostname"), "0.0.0.0",
                                 "k8s sets HOSTNAME to the pod name; the router reads it")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    get = router[probe]["httpGet"]
                    self.assertEqual(get["path"], "/health", probe)
                    self.assertIn(get["port"], ("http", ports["http"]), probe)
                # The router's own startup checks (it exits if they fail).
                max_in = int(flag_value(args, "--max-input-length"))
                max_total = int(flag_value(args, "--max-total-tokens"))
                prefill = int(flag_value(args, "--max-batch-prefill-tokens"))
                self.assertLess(max_in, max_total)
                self.assertGreaterEqual(prefill, max_in)
                self.assertEqual(router["image"], containers["shard"]["image"],
                                 "one image (runtime-lorax) serves the whole pod")
                if d != os.path.join(K8S, "base"):
                    self.assertIn("/", router["image"], "overlays set a registry image")


# ---- Dockerfile ---------------------------------------------------------------------------------

def install_deps_packages():
    text = read(repo_path("scripts", "install-deps.sh"))
    m = re.search(r"^PKGS=\((.*?)^\)", text, re.S | re.M)
    assert m, "PKGS=( ... ) not found in scripts/install-deps.sh"
    body = re.sub(r"#.*", "", m.group(1))
    return set(body.split())


class DockerfileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.instructions = dockerfile_lint.parse(read(DOCKERFILE))
        cls.global_args, cls.stages = dockerfile_lint.stages(cls.instructions)
        cls.by_name = {s.name: s for s in cls.stages if s.name}

    def test_stage_references(self):
        names = [s.name for s in self.stages if s.name]
        self.assertEqual(len(names), len(set(names)), "duplicate stage names")
        seen = set()
        for s in self.stages:
            for ins in s.all("COPY"):
                flags, _, _ = dockerfile_lint.copy_parts(ins)
                if "from" in flags:
                    self.assertIn(flags["from"], seen,
                                  f"line {ins.line}: --from={flags['from']} is no earlier stage")
            seen.add(s.name)
        self.assertEqual(self.stages[-1].name, "runtime",
                         "the default (last) target is the shard-only image")
        for target in ("build", "runtime", "runtime-lorax"):
            self.assertIn(target, self.by_name)
        build_base = self.by_name["build"].base
        runtime_base = self.by_name["runtime-base"].base
        self.assertRegex(build_base, r"^nvidia/cuda:.*-devel-")
        self.assertEqual(build_base.replace("-devel-", "-runtime-"), runtime_base,
                         "devel and runtime images must be the same CUDA/Ubuntu version")

    def test_copy_sources_exist_and_are_sent(self):
        rules = dockerfile_lint.ignore_rules(read(DOCKERFILE + ".dockerignore"))
        for s in self.stages:
            for ins in s.all("COPY") + s.all("ADD"):
                flags, srcs, _ = dockerfile_lint.copy_parts(ins)
                if "from" in flags:
                    continue
                for src in srcs:
                    with self.subTest(line=ins.line, src=src):
                        self.assertTrue(os.path.exists(repo_path(src)), f"{src} not in the repo")
                        self.assertTrue(dockerfile_lint.sent_to_builder(src, rules),
                                        f"{src} is excluded by Dockerfile.dockerignore")
        self.assertFalse(dockerfile_lint.sent_to_builder("build/bin/phishard", rules))
        self.assertFalse(dockerfile_lint.sent_to_builder("models/tiny-phi-code", rules))

    def test_build_stage_matches_the_project(self):
        build_stage = self.by_name["build"]
        # install-deps.sh also installs what only the dev machine needs.
        dev_only = {"git", "python3", "yamllint", "python3-yaml"}
        self.assertEqual(set(dockerfile_lint.apt_packages(build_stage)),
                         install_deps_packages() - dev_only)
        copied = set()
        for ins in build_stage.all("COPY"):
            flags, srcs, _ = dockerfile_lint.copy_parts(ins)
            if "from" not in flags:
                copied.update(s.strip("/").split("/")[0] for s in srcs)
        cmake = read(repo_path("CMakeLists.txt"))
        for sub in re.findall(r"^add_subdirectory\((\w+)\)", cmake, re.M):
            self.assertIn(sub, copied, f"CMakeLists adds {sub}/ but the build stage lacks it")
        runs = " ".join(i.args for i in build_stage.all("RUN"))
        self.assertIn("-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}", runs)
        self.assertEqual(build_stage.args.get("CUDA_ARCHITECTURES"), "90a")
        self.assertIn("-DPHISHARD_CUDA=ON", runs)

    def test_runtime_stages(self):
        for name in ("runtime", "runtime-lorax"):
            s = self.by_name[name]
            with self.subTest(stage=name):
                users = s.all("USER")
                self.assertTrue(users and users[-1].args.split(":")[0] == "10001")
                self.assertTrue(s.all("ENTRYPOINT"))
        base = self.by_name["runtime-base"]
        for s in (base, self.by_name["runtime"], self.by_name["runtime-lorax"]):
            for pkg in dockerfile_lint.apt_packages(s):
                self.assertFalse(pkg.endswith("-dev"), f"{s.name} installs {pkg}")
        text = " ".join(i.args for i in base.instructions)
        self.assertIn("/usr/local/bin/phishard", text)
        self.assertIn("ln -s phishard /usr/local/bin/lorax-server", text)
        self.assertIn("runtime-packages.txt", text)
        lorax = self.by_name["runtime-lorax"]
        copies = [dockerfile_lint.copy_parts(i) for i in lorax.all("COPY")]
        self.assertTrue(any(f.get("from") == "lorax" and
                            "/usr/local/bin/lorax-router" in srcs for f, srcs, _ in copies))
        self.assertEqual(self.by_name["lorax"].base, self.global_args["LORAX_IMAGE"])

    def test_pipes_fail_the_build(self):
        # hadolint DL4006: `ldd X | grep ...` under /bin/sh hides a failing ldd. Every stage whose
        # RUN has a pipe sets SHELL with -o pipefail (itself or in the stage it builds on).
        def has_pipefail(stage):
            while stage is not None:
                if any("pipefail" in i.args for i in stage.all("SHELL")):
                    return True
                stage = self.by_name.get(stage.base)
            return False
        for s in self.stages:
            piped = [i for i in s.all("RUN") if re.search(r"(?<!\|)\|(?!\|)", i.args)]
            if piped:
                with self.subTest(stage=s.name or s.index):
                    self.assertTrue(has_pipefail(s), f"line {piped[0].line}: a pipe without pipefail")

    def image_binaries(self):
        """Names the runtime-lorax image installs in /usr/local/bin (on PATH)."""
        names = set()
        for stage in ("runtime-base", "runtime-lorax", "runtime"):
            s = self.by_name[stage]
            for ins in s.all("COPY"):
                _, srcs, dest = dockerfile_lint.copy_parts(ins)
                if dest.endswith("/"):
                    if dest.rstrip("/") == "/usr/local/bin":
                        names.update(os.path.basename(src) for src in srcs)
                elif os.path.dirname(dest) == "/usr/local/bin":
                    names.add(os.path.basename(dest))
            for ins in s.all("RUN"):
                names.update(re.findall(r"ln -s \S+ /usr/local/bin/(\S+)", ins.args))
        return names

    def test_every_command_the_manifests_run_is_in_the_image(self):
        # Container commands, exec probes and preStop hooks resolve on PATH inside the image.
        names = self.image_binaries()
        for b in ("phishard", "lorax-server", "lorax-router", "lorax-launcher",
                  "lorax-router-wait", "phishard-prestop"):
            self.assertIn(b, names)
        for d in kustomize_dirs():
            pod = build(d)[("StatefulSet", "phishard")]["spec"]["template"]["spec"]
            for c in pod["containers"]:
                cmds = [c["command"]]
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if "exec" in c.get(probe, {}):
                        cmds.append(c[probe]["exec"]["command"])
                pre = c.get("lifecycle", {}).get("preStop", {}).get("exec")
                if pre:
                    cmds.append(pre["command"])
                for cmd in cmds:
                    with self.subTest(kustomization=d, container=c["name"], command=cmd):
                        self.assertIn(cmd[0], names, "not installed in the image")

    def test_runtime_package_list_of_the_built_binary(self):
        phishard_cli()  # the binary exists
        r = subprocess.run([repo_path("deploy", "scripts", "runtime-packages.sh"), BIN],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        pkgs = r.stdout.split()
        self.assertTrue(any(p.startswith("libgrpc++") for p in pkgs), pkgs)
        self.assertTrue(any(p.startswith("libprotobuf") for p in pkgs), pkgs)
        self.assertFalse([p for p in pkgs if p.endswith("-dev")], pkgs)

    def test_runtime_package_list_refuses_unowned_libraries(self):
        phishard_cli()
        # The same binary, but one library resolved from a directory no package owns.
        ldd = subprocess.run(["ldd", BIN], capture_output=True, text=True, check=True).stdout
        lib = re.search(r"(libz\.so\.1|libstdc\+\+\.so\.6) => (\S+)", ldd)
        self.assertIsNotNone(lib, ldd)
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(lib.group(2), os.path.join(d, lib.group(1)))
            r = subprocess.run([repo_path("deploy", "scripts", "runtime-packages.sh"), BIN],
                               capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, LD_LIBRARY_PATH=d))
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("no installed package owns", r.stderr)


# ---- docs ---------------------------------------------------------------------------------------

DOCS = ["README.md", "docs/quickstart.md", "docs/kubernetes.md", "docs/flags.md",
        "docs/troubleshooting.md"]
SUBCOMMAND_RX = (r"(?:phishard|lorax-server)\s+"
                 r"(serve|download-weights|tokenize|generate|client|launch)")
# `phishard SUB ...`, or `docker run --entrypoint phishard IMAGE SUB ...`.
COMMAND_RX = (r"(?:--entrypoint[ =](?:phishard|lorax-server)\s+\S+|(?:phishard|lorax-server))\s+"
              r"([a-z][a-z-]*)\b([^|;&]*)")


def doc_sections(text):
    """{subcommand: section text} of the `## phishard SUB` sections of docs/flags.md."""
    out = {}
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        heading = part.splitlines()[0]
        m = re.search(SUBCOMMAND_RX, heading)
        if m:
            out[m.group(1)] = part
    return out


class DocsTest(unittest.TestCase):
    def test_flags_md_matches_the_binary(self):
        cli = phishard_cli()
        sections = doc_sections(read(repo_path("docs", "flags.md")))
        self.assertEqual(set(sections), set(cli), "one `## phishard SUB` section per subcommand")
        for sub, text in sections.items():
            with self.subTest(subcommand=sub):
                # | flag(s) | env twin | default | meaning |
                cells = [line.split("|")[1:3] for line in text.splitlines()
                         if line.startswith("|") and line.count("|") >= 5]
                flags = set(re.findall(r"`(--[a-z0-9-]+)`", " ".join(c[0] for c in cells)))
                envs = set(re.findall(r"`(PHISHARD_[A-Z0-9_]+)`", " ".join(c[1] for c in cells)))
                self.assertEqual(flags, cli[sub]["flags"] - {"--help"})
                self.assertEqual(envs, cli[sub]["envs"])

    def test_env_table_matches_the_code(self):
        text = read(repo_path("docs", "flags.md"))
        m = re.search(r"^## Environment variables\n(.*?)(?=^## |\Z)", text, re.S | re.M)
        self.assertIsNotNone(m, "docs/flags.md needs a '## Environment variables' section")
        rows = [line for line in m.group(1).splitlines() if line.startswith("|")]
        documented = set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]+)`", "\n".join(rows), re.M))
        self.assertEqual(documented, code_env_vars(),
                         "the table lists exactly the variables server/ model/ parallel/ read")

    def test_every_documented_command_line_exists(self):
        cli = phishard_cli()
        known_env = all_env_twins() | code_env_vars()  # twins, and e.g. PHISHARD_TEST_STALL_MS
        for doc in DOCS:
            text = read(repo_path(doc)).replace("\\\n", " ")
            with self.subTest(doc=doc):
                for name in re.findall(r"\bPHISHARD_[A-Z0-9_]+", text):
                    # Kubernetes service links (PHISHARD_SERVICE_HOST, PHISHARD_PORT_80_TCP...)
                    # are named in the docs as what to avoid.
                    if re.fullmatch(r"PHISHARD_(SERVICE_(HOST|PORT)\w*|PORT(_\w+)?)", name):
                        continue
                    self.assertIn(name, known_env, f"{doc}: phishard reads no {name}")
                for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
                    for line in block.splitlines():
                        for m in re.finditer(COMMAND_RX, line):
                            sub = m.group(1)
                            if sub == "phishard-lorax":
                                continue
                            self.assertIn(sub, cli, f"{doc}: `{line.strip()}`")
                            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2)):
                                self.assertIn(flag, cli[sub]["flags"] | {"--help"},
                                              f"{doc}: `{line.strip()}`")

    def test_docs_link_to_existing_files(self):
        for doc in DOCS:
            text = read(repo_path(doc))
            for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
                with self.subTest(doc=doc, link=target):
                    path = os.path.normpath(os.path.join(os.path.dirname(repo_path(doc)), target))
                    self.assertTrue(os.path.exists(path), f"{doc} links to missing {target}")


def main():
    global BIN
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, help="the built phishard executable")
    opts, rest = parser.parse_known_args()
    BIN = os.path.abspath(opts.bin)
    scripts_check.configure(BIN, REPO)
    unittest.main(argv=[sys.argv[0], "-v"] + rest)


if __name__ == "__main__":
    main()
