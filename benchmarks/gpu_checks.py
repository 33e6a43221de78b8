"""Every GPU check in one call, for a borrowed GPU machine with no network (run by benchmarks/gpu_checks.sh).

Steps, each a subprocess under its own time limit, in this order:

  preflight                 Python, torch and CUDA versions, GPU and driver, which of albumentations, scipy,
                            DALI and pytest import, and whether the carried wheels fit this Python
  install                   microtrain's wheel from .whl/ (benchmarks/gpu_prepare.py made it) plus only the
                            carried wheels this machine lacks, into a scratch folder on PYTHONPATH
  registry                  `microtrain plugins` lists every built-in plugin the wheel declares
  cuda_tests                tests/test_cuda.py (CUDA)
  loader_throughput         benchmarks/loader_throughput.py on the device
  epoch_throughput_fp32     benchmarks/epoch_throughput.py, microtrain against a bare loop, fp32
  epoch_throughput_bf16     the same in bf16
  seed_run                  the seed recipe, two epochs, tensor loader, synthetic data of CIFAR-10's size
  dali                      tests/test_dali_loader.py on the GPU (CUDA; DALI missing: not run, never ok)
  epoch_throughput_compile  epoch_throughput.py with compile=true, tensor loader only (CUDA)

Every result is written into $OUT as soon as it exists: summary.json (rewritten after every step; each
step `ok`, `failed` with its error, or `not run` with the reason), log.txt (every step's output as it
comes), and one JSON file per measuring step. The step budgets add up to --budget (480 s: 8 minutes)
and a step never runs past the time left, so the whole call fits by construction; sizes are chosen so
each step should take about half its budget on an H100-class card (not measured yet).

Without CUDA the same steps run with CPU sizes, the CUDA steps are `not run: no CUDA`: that is the dry
run, which `--dry-run` sets up as the GPU machine's software (see docs/speed.md#gpu-checks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 480
SEED_RECIPE = "recipes/cifar10_dsconv.yaml"
# The dry run's virtual environment: the GPU machine's software as the issue describes it, CPU torch.
DRY_RUN_PACKAGES = ("torch==2.13.0", "pluggy", "pyyaml", "rich", "matplotlib", "opencv-python-headless")
# The steps in order: (name, budget in seconds, needs CUDA). The budgets add up to BUDGET_SECONDS; the last step
# (compile, whose time is the hardest to foresee) may also use what the steps before it left unspent.
STEPS = (("preflight", 15, False), ("install", 35, False), ("registry", 20, False), ("cuda_tests", 170, True),
         ("loader_throughput", 35, False), ("epoch_throughput_fp32", 40, False), ("epoch_throughput_bf16", 40, False),
         ("seed_run", 45, False), ("dali", 30, True), ("epoch_throughput_compile", 50, True))
CUDA_STEPS = tuple(name for name, _, cuda in STEPS if cuda)

# What a step's subprocess learns of the machine, in the preflight's words.
PREFLIGHT = r"""
import importlib, importlib.metadata as md, json, os, platform, sys
info = {"python": platform.python_version(), "python_tag": f"cp{sys.version_info[0]}{sys.version_info[1]}",
        "executable": sys.executable, "cpus": os.cpu_count()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available())
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    gpus=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
except Exception as exc:
    info.update(torch=None, cuda=False, torch_error=f"{type(exc).__name__}: {exc}")
imports = {}
for module, dists in (("albumentations", ["albumentations"]), ("scipy", ["scipy"]),
                      ("nvidia.dali", ["nvidia-dali-cuda120", "nvidia-dali-cuda130"]), ("pytest", ["pytest"]),
                      ("cv2", ["opencv-python-headless", "opencv-python"]), ("numpy", ["numpy"]),
                      ("microtrain", ["microtrain"])):
    try:
        importlib.import_module(module)
        version = None
        for name in dists:
            try:
                version = md.version(name); break
            except md.PackageNotFoundError:
                pass
        imports[module] = version or "yes"
    except Exception as exc:
        imports[module] = f"no ({type(exc).__name__}: {str(exc)[:120]})"
info["imports"] = imports
print(json.dumps(info))
"""

# Which carried wheels this interpreter can install, and which distributions it already has.
INSTALL_PLAN = r"""
import importlib.metadata as md, json, sys
try:
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
except ImportError:
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import parse_wheel_filename
supported = set(sys_tags())
plan = {"install": [], "present": [], "incompatible": []}
for path in sys.argv[1:]:
    name, version, _, tags = parse_wheel_filename(path.rsplit("/", 1)[-1])
    if name != "microtrain":
        try:
            plan["present"].append(f"{name} {md.version(name)}"); continue
        except md.PackageNotFoundError:
            pass
    (plan["install"] if tags & supported else plan["incompatible"]).append(path)
print(json.dumps(plan))
"""


def unmeasured_loaders(report: Path) -> list[str]:
    """The loaders a benchmark's JSON report did not measure, with why; DALI's absence is the dali step's to say."""
    if not report.is_file():
        return [f"{report.name} was not written"]
    data = json.loads(report.read_text())
    rows = data.get("results") or data.get("loaders") or []
    problems = [f"{r['loader']}: {r.get('reason') or r.get('skipped')}" for r in rows
                if (r.get("status", "ok") != "ok" or "skipped" in r) and r["loader"] != "dali"]
    return problems if rows else [f"{report.name} holds no result"]


@dataclass
class Step:
    name: str
    budget: float  # seconds this step may take at most
    cuda: bool = False  # needs a GPU: `not run: no CUDA` without one
    result: dict = field(default_factory=dict)


class Checks:
    """Runs the steps, keeps the summary in $OUT current, and the time left."""

    def __init__(self, out: Path, python: str, budget: float, carry: Path):
        self.out, self.python, self.carry = out, python, carry
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.scratch = Path(tempfile.mkdtemp(prefix="microtrain-gpu-checks-"))
        self.site = self.scratch / "site"
        self.env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1",
                    "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"}
        self.log = out / "log.txt"
        self.summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_seconds": budget,
                              "preflight": {}, "steps": {}}
        self.preflight: dict = {}

    # -- bookkeeping ----------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, step: Step, status: str, **details) -> None:
        step.result = {"status": status, **details}
        self.summary["steps"][step.name] = step.result
        self.summary["elapsed_seconds"] = round(time.monotonic() - self.started, 1)
        self.write_summary()
        print(f"== {step.name}: {status}" + (f" ({details['seconds']} s)" if "seconds" in details else "")
              + (f": {details.get('error') or details.get('reason')}" if status != "ok" else ""), flush=True)

    def write_summary(self) -> None:
        tmp = self.out / ".summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1) + "\n")
        os.replace(tmp, self.out / "summary.json")

    def note(self, text: str) -> None:
        with open(self.log, "a") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")

    # -- running --------------------------------------------------------------------------------
    def run(self, step: Step, command: list[str], timeout: float | None = None) -> tuple[int | None, float, str]:
        """Run ``command`` with its output appended to log.txt; (exit status or None on time-out, seconds, tail)."""
        limit = max(1.0, min(timeout or step.budget, self.left()))
        self.note(f"\n== {step.name} (limit {limit:.0f} s): {' '.join(command)}")
        start = time.monotonic()
        with open(self.log, "a") as handle:
            position = handle.tell()
            process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                status: int | None = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)  # the whole group: DataLoader workers, compile workers
                process.wait()
                status = None
        seconds = round(time.monotonic() - start, 1)
        with open(self.log, "rb") as handle:
            handle.seek(position)
            tail = handle.read().decode(errors="replace").strip().splitlines()[-6:]
        return status, seconds, "\n".join(tail)[-800:]

    def command_step(self, step: Step, command: list[str], outputs: list[Path] = ()) -> bool:
        if self.left() < 5:
            self.record(step, "not run", reason="out of time (the budget is spent)")
            return False
        status, seconds, tail = self.run(step, command)
        files = [p.name for p in outputs if p.is_file()]
        unmeasured = [problem for p in outputs for problem in unmeasured_loaders(p)]
        if status == 0 and unmeasured:  # a benchmark that ran but measured nothing has not succeeded
            self.record(step, "failed", seconds=seconds, error="not measured: " + "; ".join(unmeasured)[:800], files=files)
            return False
        if status == 0:
            self.record(step, "ok", seconds=seconds, files=files)
            return True
        error = f"timed out after {seconds} s" if status is None else f"exit status {status}"
        self.record(step, "failed", seconds=seconds, error=f"{error}: {tail}", files=files)
        return False

    def python_json(self, code: str, *args: str, timeout: float = 60) -> dict:
        result = subprocess.run([self.python, "-c", code, *args], cwd=REPO, env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode:
            raise RuntimeError((result.stderr.strip().splitlines() or ["?"])[-1])
        return json.loads(result.stdout.strip().splitlines()[-1])

    # -- the steps --------------------------------------------------------------------------------
    @property
    def cuda(self) -> bool:
        return bool(self.preflight.get("cuda"))

    def imports(self, module: str) -> bool:
        return not str(self.preflight.get("imports", {}).get(module, "no")).startswith("no")

    def do_preflight(self, step: Step) -> None:
        start = time.monotonic()
        try:
            self.preflight = self.python_json(PREFLIGHT, timeout=step.budget)
        except Exception as exc:  # noqa: BLE001 - recorded, the later steps say what they can
            self.record(step, "failed", error=f"{type(exc).__name__}: {exc}")
            return
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=30)
            self.preflight["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
        manifest = self.carry / "carry.json"
        if manifest.is_file():
            carried = json.loads(manifest.read_text())
            self.preflight["carried_for_python"] = carried["python"]
            self.preflight["carried_bytes"] = carried["wheel_bytes"]
            self.preflight["carried_fits_this_python"] = carried["python"] == self.preflight["python"].rsplit(".", 1)[0]
        self.summary["preflight"] = self.preflight
        self.note(json.dumps(self.preflight, indent=1))
        self.record(step, "ok", seconds=round(time.monotonic() - start, 1))

    def do_install(self, step: Step) -> None:
        wheels = sorted(str(p) for p in self.carry.glob("*.whl"))
        if not wheels:
            self.record(step, "failed", error=f"no wheels in {self.carry}: run python benchmarks/gpu_prepare.py first "
                                              "and carry .whl")
            return
        try:
            plan = self.python_json(INSTALL_PLAN, *wheels)
        except Exception as exc:  # noqa: BLE001
            self.record(step, "failed", error=f"reading the carried wheels: {exc}")
            return
        if not any(Path(w).name.startswith("microtrain-") for w in plan["install"]):
            self.record(step, "failed", error="microtrain's wheel is missing or does not fit this Python")
            return
        status, seconds, tail = self.run(step, [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                                "--no-compile", "--no-cache-dir", "--target", str(self.site),
                                                *plan["install"]])
        details = {"installed": [Path(w).name for w in plan["install"]], "already_present": plan["present"],
                   "incompatible_with_this_python": [Path(w).name for w in plan["incompatible"]]}
        if status != 0:
            self.record(step, "failed", seconds=seconds, error=f"pip install: {tail}", **details)
            return
        self.env["PYTHONPATH"] = os.pathsep.join([str(self.site), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.preflight = self.python_json(PREFLIGHT) | {k: v for k, v in self.preflight.items() if k.startswith(("carried", "nvidia"))}
        self.summary["preflight"]["imports_after_install"] = self.preflight["imports"]
        self.record(step, "ok", seconds=seconds, **details)

    def do_registry(self, step: Step) -> None:
        """`microtrain plugins` works, and every entry point the installed wheel declares is found and imports."""
        declared = []
        for info in self.site.glob("microtrain-*.dist-info/entry_points.txt"):
            section = None
            for line in info.read_text().splitlines():
                line = line.strip()
                if line.startswith("["):
                    section = line.strip("[]")
                elif section == "microtrain" and "=" in line:
                    declared.append(line.split("=", 1)[0].strip())
        # `microtrain plugins` registers every installed entry point (one that fails to import fails it); the
        # names are those the interpreter's own metadata finds, each loaded again here.
        code = ("import importlib.metadata as md, json, microtrain.cli; status = microtrain.cli.main(['plugins']); "
                "eps = md.entry_points(group='microtrain'); [ep.load() for ep in eps]; "
                "print(json.dumps({'status': status, 'plugins': sorted(ep.name for ep in eps)}))")
        status, seconds, tail = self.run(step, [self.python, "-c", code])
        try:
            listed = json.loads(tail.splitlines()[-1])
        except (ValueError, IndexError):
            listed = {"status": None, "plugins": []}
        missing = sorted(set(declared) - set(listed["plugins"]))
        if status == 0 and listed["status"] == 0 and declared and not missing:
            self.record(step, "ok", seconds=seconds, plugins=len(declared))
        else:
            self.record(step, "failed", seconds=seconds, error=f"exit status {status}, `microtrain plugins` "
                        f"{listed['status']}; declared {len(declared)}, not registered: {missing}; {tail[-300:]}")

    def pytest_step(self, step: Step, paths: list[str]) -> None:
        report = self.scratch / f"{step.name}.xml"
        self.command_step(step, [self.python, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfEs",
                                      f"--junitxml={report}", *paths])
        if report.is_file():  # per-test outcomes into the summary (a file of its own would pass the 8-file limit)
            outcomes = {}
            for case in ElementTree.parse(report).iter("testcase"):
                kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                message = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
                outcomes[f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"] = (
                    kind if kind == "passed" else f"{kind}: {message[:300]}")
            step.result["tests"] = outcomes
            self.write_summary()

    # -- the plan ---------------------------------------------------------------------------------
    def sizes(self) -> dict:
        """Problem sizes: each measuring step about half its budget on an H100-class card; tiny on a CPU."""
        if self.cuda:
            # albumentations with 0 workers (the seed recipe's) is CPU-bound at a few thousand images/s: it sets these
            return {"device": "cuda", "loader": ["--workers", "0,4", "--epochs", "2", "--warmup", "1", "--limit", "10000"],
                    "epoch": ["--steps", "100", "--warmup", "20", "--repeats", "2"],
                    "compile": ["--steps", "200", "--warmup", "30", "--repeats", "1"],
                    "seed": ["data.train_size=50000", "data.test_size=10000"]}
        # On a CPU only the plumbing is checked (the dry run), on a shared 2-core machine: the least work that runs
        # it. onecycle needs 4 steps; bf16 autocast runs this model at a few images/s on CPUs without bf16 units,
        # so bf16 takes the tensor loader alone there (fp32 has run every loader by then).
        return {"device": "cpu", "loader": ["--workers", "0", "--epochs", "1", "--warmup", "0", "--limit", "512",
                                            "--batch-size", "64"],
                "epoch": ["--steps", "3", "--warmup", "1", "--repeats", "1", "--batch-size", "8"],
                "compile": ["--steps", "3", "--warmup", "1", "--repeats", "1", "--batch-size", "8"],
                "seed": ["data.train_size=192", "data.test_size=64"], "bf16_loaders": ["tensor"]}

    def run_all(self) -> int:
        steps = [Step(name, budget, cuda) for name, budget, cuda in STEPS]
        steps[-1].budget = BUDGET_SECONDS  # bounded by the time left: the whole call still ends within the budget
        self.summary["plan"] = {s.name: {"budget_seconds": s.budget, "cuda": s.cuda} for s in steps}
        for step in steps:
            self.summary["steps"][step.name] = {"status": "pending"}
        self.write_summary()
        for step in steps:
            self.one(step)
        self.summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write_summary()
        shutil.rmtree(self.scratch, ignore_errors=True)
        counts = {}
        for result in self.summary["steps"].values():
            counts[result["status"]] = counts.get(result["status"], 0) + 1
        print(f"gpu_checks: {counts} in {self.summary['elapsed_seconds']} s; {self.out / 'summary.json'}", flush=True)
        return 0 if "failed" not in counts else 1

    def one(self, step: Step) -> None:
        if step.name == "preflight":
            return self.do_preflight(step)
        if step.name == "install":
            return self.do_install(step)
        if self.summary["steps"]["install"].get("status") != "ok":
            return self.record(step, "not run", reason="microtrain is not installed (see the install step)")
        if step.name == "registry":
            return self.do_registry(step)
        if step.cuda and not self.cuda:
            return self.record(step, "not run", reason="no CUDA")
        augment = self.imports("albumentations")
        size = self.sizes()
        device = size["device"]
        loaders = ["tensor", "albumentations", "dali"] if augment else ["tensor"]
        # Without albumentations (carried wheels for another Python) the recipe's augment list cannot be read:
        # the tensor loader then runs without augmentation, and the summary says so.
        no_augment = [] if augment else ["loader.augment=[]"]
        if not augment:
            self.summary["note"] = "albumentations does not import here: tensor loader only, without augmentation"
        if step.name == "cuda_tests":
            return self.pytest_step(step, ["tests/test_cuda.py"])
        if step.name == "dali":
            if not self.imports("nvidia.dali"):
                return self.record(step, "not run", reason="NVIDIA DALI does not import here (its wheel, about 400 MB, "
                                                           "cannot travel): the dali loader is not measured")
            return self.pytest_step(step, ["tests/test_dali_loader.py"])
        bench = self.out / f"{step.name}.json"
        if step.name == "loader_throughput":
            command = [self.python, "benchmarks/loader_throughput.py", "--device", device, "--loaders", ",".join(loaders),
                       *size["loader"], "--json", str(bench), *([] if augment else ["--augment", "none"])]
            return self.command_step(step, command, [bench])
        if step.name.startswith("epoch_throughput"):
            precision = {"epoch_throughput_bf16": "precision=bf16"}.get(step.name, "precision=fp32")
            compiled = step.name.endswith("compile")
            chosen = ["tensor"] if compiled else size.get("bf16_loaders", loaders) if "bf16" in precision else loaders
            command = [self.python, "benchmarks/epoch_throughput.py", "--loaders", *chosen,
                       *size["compile" if compiled else "epoch"], "--json", str(bench), f"device={device}", precision,
                       *(["compile=true"] if compiled else []), *no_augment]
            return self.command_step(step, command, [bench])
        if step.name == "seed_run":
            run_dir = self.scratch / "seed_run"
            command = [self.python, "-m", "microtrain", "run", SEED_RECIPE, "--run-dir", str(run_dir), "epochs=2",
                       f"device={device}", "loader.name=tensor", "data.name=synthetic", *size["seed"],
                       "plugins=[progress, metrics]", *no_augment]
            ok = self.command_step(step, command)
            epochs = []
            metrics = run_dir / "metrics.jsonl"
            for line in metrics.read_text().splitlines() if metrics.is_file() else []:
                row = json.loads(line)
                epochs.append({k: row.get(k) for k in ("epoch", "train_loss", "train_acc", "test_acc", "epoch_seconds",
                                                       "train_images_per_second")})
            (self.out / "seed_run.json").write_text(json.dumps({"command": command[1:], "epochs": epochs}, indent=1) + "\n")
            step.result["epochs"] = epochs
            if ok and len(epochs) != 2:
                self.record(step, "failed", error=f"the run logged {len(epochs)} epochs, not 2", epochs=epochs)
            self.write_summary()
            return None
        raise AssertionError(step.name)


# ---------------------------------------------------------------------------------------------
# The dry run: this machine made to look like the GPU machine's software, then the same steps.

def dry_run(work: Path) -> int:
    """Prepare wheels for this Python, make a fresh virtual environment with the GPU machine's packages only
    (CPU torch), copy the working tree as the device tool would, run the checks there, and check the summary:
    every CUDA step `not run: no CUDA`, every other step `ok`."""
    started = time.monotonic()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"

    def say(text: str) -> None:
        print(f"[dry run {time.monotonic() - started:5.0f} s] {text}", flush=True)

    tree = work / "tree"
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        if (REPO / relative).is_file():
            (tree / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / relative, tree / relative)
    say(f"working tree copied to {tree}; preparing the wheels for Python {python}")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_prepare.py"), "--python", python,
                    "--out", str(tree / ".whl")], check=True)
    venv = work / "venv"
    say(f"fresh virtual environment {venv}: {' '.join(DRY_RUN_PACKAGES)}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *DRY_RUN_PACKAGES], check=True)
    out = work / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join([str(venv / "bin")] + [p for p in env.get("PATH", "").split(os.pathsep)
                                                         if not p.startswith(str(REPO))])
    env["OUT"] = str(out)
    say("running the checks as on the GPU machine")
    checks_started = time.monotonic()
    subprocess.run(["bash", "benchmarks/gpu_checks.sh"], cwd=tree, env=env)
    checks_seconds = time.monotonic() - checks_started
    summary = json.loads((out / "summary.json").read_text())
    wrong = {}
    for name, result in summary["steps"].items():
        expected = "not run: no CUDA" if name in CUDA_STEPS else "ok"
        got = result["status"] + (f": {result['reason']}" if result.get("reason") else "")
        if got != expected:
            wrong[name] = f"{got} (expected {expected})"
    verdict = {"dry_run_seconds": round(time.monotonic() - started, 1), "checks_seconds": round(checks_seconds, 1),
               "load_average_at_end": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count(),
               "steps": {n: r["status"] + (f": {r['reason']}" if r.get("reason") else "") for n, r in summary["steps"].items()},
               "as_expected": not wrong, "unexpected": wrong, "out": str(out)}
    (work / "dry_run.json").write_text(json.dumps(verdict, indent=1) + "\n")
    say(json.dumps(verdict, indent=1))
    return 0 if not wrong else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="simulate the GPU machine's software here (fresh venv, CPU torch) and check the summary")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "microtrain-gpu-dry-run",
                        help="the dry run's folder (emptied first)")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help=f"seconds for all steps (default {BUDGET_SECONDS})")
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run(args.work)
    out = Path(os.environ.get("OUT") or REPO / "gpu-checks-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    return Checks(out, os.environ.get("PYTHON") or sys.executable, args.budget, REPO / ".whl").run_all()


if __name__ == "__main__":
    sys.exit(main())
