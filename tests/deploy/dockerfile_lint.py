"""Reads a Dockerfile and a .dockerignore the way Docker does, enough to check deploy/Dockerfile
without a Docker engine: instructions with their line numbers, build stages, ARG defaults, COPY
sources, apt-get packages, and whether a context path survives the ignore file.
"""

import re
import shlex


class Instruction:
    def __init__(self, line, keyword, args):
        self.line = line          # 1-based line of the instruction's first line
        self.keyword = keyword    # upper case: FROM, RUN, COPY, ...
        self.args = args          # the rest, continuation lines joined with spaces

    def __repr__(self):
        return f"{self.line}: {self.keyword} {self.args}"


def parse(text):
    """Instructions of a Dockerfile; comments (also inside continuations) dropped."""
    out, buf, start = [], "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    if buf:
        raise ValueError(f"line {start}: instruction continues past the end of the file")
    return out


def substitute(text, args):
    """${NAME} and $NAME from `args` (a dict); unknown names are left as they are."""
    def repl(m):
        name = m.group(1) or m.group(2)
        return args.get(name, m.group(0))
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", repl, text)


class Stage:
    def __init__(self, index, base, name, line):
        self.index = index
        self.base = base          # image or earlier stage name, global ARGs substituted
        self.name = name          # "" when unnamed
        self.line = line
        self.instructions = []
        self.args = {}            # ARG defaults declared in this stage

    def all(self, keyword):
        return [i for i in self.instructions if i.keyword == keyword]


def stages(instructions):
    """(global ARG defaults, [Stage]) of a parsed Dockerfile."""
    global_args, result = {}, []
    for ins in instructions:
        if ins.keyword == "ARG" and not result:
            name, _, default = ins.args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
            continue
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            result.append(Stage(len(result), substitute(words[0], global_args), name, ins.line))
            continue
        if not result:
            raise ValueError(f"line {ins.line}: {ins.keyword} before the first FROM")
        stage = result[-1]
        stage.instructions.append(ins)
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            stage.args[name.strip()] = default.strip().strip('"')
    return global_args, result


def copy_parts(ins):
    """(flags dict, sources, destination) of a COPY/ADD instruction (shell form)."""
    words = shlex.split(ins.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    if len(words) < 2:
        raise ValueError(f"line {ins.line}: COPY needs a source and a destination")
    return flags, words[:-1], words[-1]


def apt_packages(stage):
    """Package names passed to `apt-get install` in the stage's RUN instructions."""
    pkgs = []
    for ins in stage.all("RUN"):
        for m in re.finditer(r"apt-get install((?:\s+[^\s&;|]+)*)", ins.args):
            pkgs.extend(w for w in m.group(1).split() if not w.startswith("-"))
    return pkgs


def _glob_regex(pattern):
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def ignore_rules(text):
    """[(negated, regex)] of a .dockerignore, in file order."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:].strip() if neg else line
        pat = pat.strip("/")
        rules.append((neg, _glob_regex(pat)))
    return rules


def sent_to_builder(path, rules):
    """Whether context path `path` (repo-relative) survives the ignore rules: the last rule that
    matches the path or one of its parent directories decides, as in Docker."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for neg, rx in rules:
        if any(rx.match(p) for p in prefixes):
            included = neg
    return included
