#!/usr/bin/env python3
"""Compile-check the CUDA kernels without a GPU (and without a CUDA torch).

Compiles the device code of every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a and
`-Xptxas -v` (one job per file and architecture), using the flags setup.py builds with, and
fails on a compile error or warning in our sources, or on any register spill (non-zero
"spill stores"/"spill loads") in our kernels. Also checks that the launcher header
csrc/cuda/kernels.h compiles with the host C++ compiler alone, as csrc/cuda/*.cpp include it,
links and runs tools/cuda_link_check.cpp against the objects (every launcher is defined; the
argument checks work; no GPU needed), and syntax-checks the CUDA backend (csrc/cuda/*.cpp) and
the files that register it (csrc/register.cpp, csrc/module.cpp) with MAGNETO_WITH_CUDA against
torch's headers (skipped without torch).
Prints, per kernel template, its instantiations and register range per architecture.

The nvcc compiles (five minutes of CPU time, the longest test of the suite) and the link check
are skipped when tests/cuda_compiled.json holds their results for the same inputs: a key over
nvcc's version, the flags, the architectures, this file and every project file the .cu files
and tools/cuda_link_check.cpp include (quoted includes, followed transitively). nvcc is
deterministic, so the same inputs give the same kernels, registers and spills; the results are
checked again as if just compiled. Where the inputs changed, everything is compiled; with the
nvcc that wrote the file, the check then fails until the file is rewritten (--write-results),
so that the committed results stay those of the committed sources (CI compiles only after a
change to them). The host-compiler checks (the launcher header, the MAGNETO_WITH_CUDA files)
always run: they are cheap and read torch's headers, which the key leaves out.

    python tools/check_cuda.py [-j JOBS] [--verbose] [--no-cache] [--write-results]

--no-cache compiles everything and fails where the file's results for the same inputs differ.

nvcc is taken from $NVCC, then PATH, then $CUDA_HOME/bin. Exit status: 0 ok, 1 failed,
2 nvcc not found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHS = (("compute_80", "sm_80"), ("compute_90a", "sm_90a"))
# Keep in step with setup.py's nvcc flags, plus the ones torch's CUDAExtension adds
# (torch.utils.cpp_extension.COMMON_NVCC_FLAGS: no implicit half/bfloat16 conversions).
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "--use_fast_math",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-Xptxas",
    "-v",
    f"-I{ROOT / 'csrc'}",
]

RESULTS = ROOT / "tests" / "cuda_compiled.json"
LINK_CHECK = ROOT / "tools" / "cuda_link_check.cpp"
QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
PROPS = re.compile(r"Function properties for (\S+)")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")


def find_nvcc() -> str | None:
    for candidate in (
        os.environ.get("NVCC"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def cuda_include(nvcc: str) -> Path:
    """The CUDA include directory: $CUDA_HOME's, the one beside nvcc, or what nvcc reports."""
    beside_nvcc = str(Path(nvcc).resolve().parents[1])
    for base in (os.environ.get("CUDA_HOME"), beside_nvcc, "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_runtime_api.h").exists():
            return Path(base) / "include"
    out = subprocess.run(
        [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
    ).stderr
    match = re.search(r"INCLUDES=\"-I([^\"]+?)/?\"", out)
    return Path(match.group(1)) if match else Path("/usr/local/cuda/include")


def compile_cu(
    nvcc: str, source: Path, arch: tuple[str, str], obj: Path | None
) -> tuple[int, str, float]:
    """Device code only (-cubin), or a full object (host code too) when `obj` is given."""
    virtual, real = arch
    out = ["-c", "-o", str(obj)] if obj else ["-cubin", "-o", os.devnull]
    cmd = [nvcc, *out, *NVCC_FLAGS, "-gencode", f"arch={virtual},code={real}", str(source)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def project_inputs(paths: list[Path]) -> list[Path]:
    """`paths` and the project files they include, transitively: each quoted include resolved
    beside the including file or under csrc/ (nvcc's -I), as the compiler finds it; includes
    inside #if branches count too (a superset: the key may change where the compile would not)."""
    seen: set[Path] = set()
    todo = [p.resolve() for p in paths]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in QUOTED_INCLUDE.findall(path.read_text()):
            for base in (path.parent, ROOT / "csrc"):
                if (base / name).is_file():
                    todo.append((base / name).resolve())
                    break
    return sorted(seen)


def keyed_files(sources: list[Path]) -> list[Path]:
    """The files whose contents the key covers: the .cu files, the link check's source, this
    tool, and what they include."""
    return project_inputs([*sources, LINK_CHECK, Path(__file__)])


def inputs_key(nvcc_version: str, sources: list[Path]) -> str:
    """What the compiles and the link check depend on (the module docstring)."""
    digest = hashlib.sha256()
    flags = [flag.replace(str(ROOT), "<root>") for flag in NVCC_FLAGS]
    digest.update(json.dumps([nvcc_version, flags, ARCHS]).encode())
    for path in keyed_files(sources):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def load_results() -> dict:
    try:
        return json.loads(RESULTS.read_text())
    except FileNotFoundError:
        return {}


def write_results(build: str, key: str, records: list[dict]) -> None:
    """A record a line, so that a change to the kernels reads as a diff of theirs."""
    lines = ",\n".join(json.dumps(r, sort_keys=True) for r in records)
    head = json.dumps({"nvcc": build, "key": key})[:-1]
    RESULTS.write_text(f'{head}, "records": [\n{lines}\n]}}\n')


def compile_all(nvcc: str, sources: list[Path], jobs: int) -> tuple[bool, list[dict]]:
    """Every .cu for every architecture, then the link check: (failed, records)."""
    failed, records = False, []
    # Largest files first for a balanced pool; the last architecture also builds host objects.
    sources = sorted(sources, key=lambda p: -p.stat().st_size)
    tasks = [(source, arch) for source in sources for arch in ARCHS]
    with tempfile.TemporaryDirectory(prefix="check_cuda_") as tmp:
        workdir = Path(tmp)

        def obj_for(source, arch):
            return workdir / f"{source.stem}.o" if arch == ARCHS[-1] else None

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = pool.map(lambda t: compile_cu(nvcc, t[0], t[1], obj_for(*t)), tasks)
            for (source, (_, real)), (rc, log, seconds) in zip(tasks, results):
                rel = source.relative_to(ROOT)
                ours = [
                    ln
                    for ln in log.splitlines()
                    if re.search(r"\b(error|warning)\b", ln, re.I) and "csrc/" in ln
                ]
                if rc != 0:
                    print(f"FAIL {rel} ({real}): nvcc exit status {rc}\n{log}")
                    failed = True
                    continue
                if ours:
                    print(f"FAIL {rel} ({real}): warnings in our sources:\n" + "\n".join(ours))
                    failed = True
                recs = parse(log)
                print(f"  {rel} ({real}): {len(recs)} kernels in {seconds:.0f} s")
                records += recs
        if not failed:
            rc, out = link_check(nvcc, [obj_for(s, ARCHS[-1]) for s in sources], workdir)
            print(("  " if rc == 0 else "FAIL ") + out.strip().replace("\n", "\n  "))
            failed |= rc != 0
    # demangled: the mangled names of anonymous namespaces hash the source's path
    names = demangle(sorted({r["name"] for r in records}))
    for r in records:
        r["name"] = names[r["name"]]
    records.sort(key=lambda r: (r["name"], r["arch"]))
    return failed, records


def link_check(nvcc: str, objects: list[Path], workdir: Path) -> tuple[int, str]:
    """Links tools/cuda_link_check.cpp with the objects (every launcher of kernels.h must be
    defined) and runs it: argument checks and empty sizes, no GPU needed."""
    exe = workdir / "cuda_link_check"
    proc = subprocess.run(
        [
            nvcc,
            "-std=c++17",
            f"-I{ROOT / 'csrc'}",
            "-o",
            str(exe),
            str(ROOT / "tools" / "cuda_link_check.cpp"),
            *map(str, objects),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return proc.returncode, "link failed:\n" + proc.stdout + proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    return run.returncode, run.stdout + run.stderr


def check_header() -> tuple[int, str]:
    """kernels.h must compile with the host compiler and the CUDA headers only."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return 0, "no host C++ compiler found; header check skipped"
    nvcc = find_nvcc()
    src = (
        '#include "cuda/kernels.h"\n'
        "int main() { return magneto::cuda::NormForwardParams{}.rows > 0; }\n"
    )
    proc = subprocess.run(
        [
            cxx,
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Wextra",
            "-Werror",
            f"-I{ROOT / 'csrc'}",
            f"-I{cuda_include(nvcc)}",
            "-x",
            "c++",
            "-",
        ],
        input=src,
        capture_output=True,
        text=True,
    )
    return proc.returncode, proc.stdout + proc.stderr


def check_orchestration(workdir: Path, jobs: int) -> tuple[int, str]:
    """csrc/cuda/*.cpp, csrc/register.cpp and csrc/module.cpp as a CUDA build compiles them
    (MAGNETO_WITH_CUDA), syntax-checked by the host compiler against torch's headers: a CPU
    build compiles neither the CUDA backend nor the CUDA branches of the others, so without this
    a mistake there would only show on a GPU machine."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return 0, "no host C++ compiler found; orchestration check skipped"
    try:
        import sysconfig

        from torch.utils.cpp_extension import include_paths
    except ImportError as err:
        return 0, f"torch not importable ({err}); orchestration check skipped"
    includes = [*include_paths(), sysconfig.get_paths()["include"]]
    # CPU wheels of torch ship c10/cuda's headers but not the one CMake generates for them.
    macros = Path("c10") / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not any((Path(p) / macros).exists() for p in includes):
        stub = workdir / "stub"
        (stub / macros).parent.mkdir(parents=True, exist_ok=True)
        (stub / macros).write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(stub))
    includes.append(str(cuda_include(find_nvcc())))
    flags = [
        "-std=c++20",
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-DMAGNETO_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-I{ROOT / 'csrc'}",
        *(f"-I{p}" for p in includes),
    ]
    sources = [
        *sorted(CUDA_DIR.glob("*.cpp")),
        ROOT / "csrc" / "register.cpp",
        ROOT / "csrc" / "module.cpp",
    ]

    def compile_one(source: Path) -> tuple[Path, int, str]:
        proc = subprocess.run([cxx, *flags, str(source)], capture_output=True, text=True)
        return source, proc.returncode, proc.stdout + proc.stderr

    rc, report = 0, []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for source, code, log in pool.map(compile_one, sources):
            rel = source.relative_to(ROOT)
            ours = [
                ln
                for ln in log.splitlines()
                if re.search(r"\b(error|warning)\b", ln, re.I) and "csrc/" in ln
            ]
            if code != 0 or ours:
                rc = 1
                report.append(f"FAIL {rel} (host compiler, MAGNETO_WITH_CUDA):\n{log}")
            else:
                report.append(f"{rel}: compiles with MAGNETO_WITH_CUDA")
    return rc, "\n".join(report)


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def template_name(demangled: str) -> str:
    """'void magneto::...::norm_forward_rows<float, ...>(...)' -> 'norm_forward_rows'."""
    head = demangled.replace("(anonymous namespace)::", "").split("(")[0]
    head = head.split("<")[0]
    return head.split("::")[-1].replace("void ", "")


def parse(log: str) -> list[dict]:
    """One record per (kernel, arch): its mangled name, registers, stack frame, spill bytes."""
    records, current, props_for = [], {}, None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = {"name": m.group(1), "arch": m.group(2)}
        elif m := PROPS.search(line):
            props_for = m.group(1)
        elif (m := SPILLS.search(line)) and current and props_for == current["name"]:
            current.update(
                stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))
            )
        elif (m := REGS.search(line)) and current:
            current["regs"] = int(m.group(1))
            records.append(current)
            current = {}
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--verbose", action="store_true", help="list every kernel instantiation")
    parser.add_argument(
        "--no-cache", action="store_true", help=f"compile even where {RESULTS.name} has the results"
    )
    parser.add_argument(
        "--write-results", action="store_true", help=f"compile and write {RESULTS.name}"
    )
    args = parser.parse_args()

    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda: nvcc not found (set NVCC or CUDA_HOME)", file=sys.stderr)
        return 2
    sources = sorted(CUDA_DIR.glob("*.cu"))
    if not sources:
        print(f"check_cuda: no .cu files under {CUDA_DIR}", file=sys.stderr)
        return 1
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    build = version.strip().splitlines()[-1]  # "Build cuda_13.0.r13.0/compiler.<number>_0"
    print(
        f"check_cuda: {build}; {len(sources)} files, "
        f"archs {', '.join(r for _, r in ARCHS)}, {args.jobs} jobs"
    )

    failed = False
    rc, out = check_header()
    if rc != 0:
        print(f"FAIL csrc/cuda/kernels.h does not compile with the host compiler:\n{out}")
        failed = True

    key = inputs_key(build, sources)
    stored = load_results()
    if stored.get("key") == key and not (args.no_cache or args.write_results):
        records = stored["records"]
        print(
            f"  {len(sources)} .cu files and the link check: inputs unchanged since "
            f"{RESULTS.relative_to(ROOT)} was written, their results read from it"
        )
    else:
        compile_failed, records = compile_all(nvcc, sources, args.jobs)
        failed |= compile_failed
        if compile_failed:
            print(f"  {RESULTS.relative_to(ROOT)} left as it was")
        elif args.write_results:
            write_results(build, key, records)
            print(f"  results written to {RESULTS.relative_to(ROOT)}")
        elif stored.get("key") == key and stored["records"] != records:
            print(
                f"FAIL the compiles differ from {RESULTS.relative_to(ROOT)}'s for the same inputs"
            )
            failed = True
        elif stored.get("key") != key and stored.get("nvcc") == build:
            print(
                f"FAIL the inputs changed since {RESULTS.relative_to(ROOT)} was written by this "
                "nvcc: rewrite it (python tools/check_cuda.py --write-results) with the change"
            )
            failed = True
    with tempfile.TemporaryDirectory(prefix="check_cuda_") as tmp:
        rc, out = check_orchestration(Path(tmp), args.jobs)
        print("  " + out.strip().replace("\n", "\n  "))
        failed |= rc != 0

    spills = [
        r
        for r in records
        if "magneto" in r["name"] and (r.get("spill_stores", 0) or r.get("spill_loads", 0))
    ]
    for r in spills:
        print(
            f"FAIL register spill in {r['name']} ({r['arch']}): "
            f"{r['spill_stores']} B stores, {r['spill_loads']} B loads"
        )
    failed |= bool(spills)

    table: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    stack: dict[str, int] = defaultdict(int)
    for r in records:
        name = template_name(r["name"])
        table[name][r["arch"]].append(r["regs"])
        stack[name] = max(stack[name], r.get("stack", 0))
    print(f"{'kernel':34s} {'inst':>5s}  " + "  ".join(f"{a:>13s}" for _, a in ARCHS) + "  stack")
    for name in sorted(table):
        cells = []
        for _, arch in ARCHS:
            regs = table[name].get(arch, [])
            cells.append(f"{min(regs):>4d}-{max(regs):<3d} regs" if regs else f"{'-':>13s}")
        count = len(table[name].get(ARCHS[0][1], []))
        print(f"{name:34s} {count:5d}  " + "  ".join(cells) + f"  {stack[name]:4d} B")
    if args.verbose:
        for r in sorted(records, key=lambda r: (r["name"], r["arch"])):
            print(
                f"  {r['arch']:7s} {r['regs']:4d} regs {r.get('stack', 0):4d} B stack  {r['name']}"
            )
    if not records and not failed:
        print("FAIL no kernels were compiled")
        failed = True
    print("check_cuda: FAILED" if failed else "check_cuda: ok (no errors, no spills)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
