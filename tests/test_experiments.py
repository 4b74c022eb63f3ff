"""DVC experiments with MLflow on real PTB text: `--temp` runs, a queued sweep, an MLflow server, the aggregate report.

Each test starts from a repository without an MLflow store, so the first stage to log is also the
first to create the store and the experiment, from inside a temporary DVC workspace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import run, tool_env, write_params
from pipeline.params import read_yaml
from pipeline.tracking import EXPERIMENT_ROLE, PARENT_TAG, ROLE_TAG, tracking_uri

pytestmark = pytest.mark.slow

WORKSPACE_MARKER = "stage code imported from the workspace copy"
MLFLOW_EXPERIMENT = "samba-tiny"
# Summary metrics that `evaluate` logs on each experiment's parent run.
SUMMARY_METRICS = ("samba.test.ppl_token", "samba.test.sparsity.near_zero_fraction_relative",
                   "samba.test.readout.accuracy", "baseline.test.ppl_token")


def exp_ref(project: Path, name: str) -> str:
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).stdout.split()
    (ref,) = [ref for ref in refs if ref.endswith("/" + name)]
    return ref


def experiment_runs(client: MlflowClient, role: str) -> list:
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{role}'")


def sweep_param_keys(project: Path) -> list[str]:
    """Return α, λ and any method/site keys that this version of params.yaml has."""
    from pipeline.params import flatten

    keys = flatten(read_yaml(project / "params.yaml"))
    extra = sorted(key for key in keys if key.rsplit(".", 1)[-1] in ("method", "site"))
    return ["loss.readout_weight", "loss.pruning_weight", *extra]


@pytest.fixture(scope="module")
def temp_experiment(tmp_path_factory, ptb_dir) -> dict:
    """An in-repository corpus: a `--temp` run while it is untracked, then one after `dvc add`.

    The second run also sets report.experiments: true, and its report stage skips the comparison
    because it runs in a temporary workspace.
    """
    from conftest import PROJECT_FILES, REPO_ROOT

    project = tmp_path_factory.mktemp("temp-exp") / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, project / name)
    # Only the project's copy prints this, so it shows which copy of the code the stages import.
    main = project / "pipeline" / "__main__.py"
    main.write_text(f"print({WORKSPACE_MARKER!r})\n" + main.read_text(encoding="utf-8"), encoding="utf-8")
    corpus = project / "corpus"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        lines = (ptb_dir / f"{split}.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        (corpus / f"{split}.txt").write_text("".join(lines[:400]), encoding="utf-8")
    (project / ".gitignore").write_text("/mlflow.db*\n/mlruns/\n__pycache__/\n", encoding="utf-8")
    write_params(project / "params.yaml", ptb_dir, data={"local_dir": "corpus"})
    run(["git", "init", "-q", "-b", "main"], project)
    run(["dvc", "init", "-q"], project)
    run(["git", "add", "-A", ":!corpus"], project)
    run(["git", "commit", "-q", "-m", "Set up tiny project, corpus untracked"], project)

    untracked = run(["dvc", "exp", "run", "--temp", "-n", "untracked-corpus"], project, check=False)

    run(["dvc", "add", "-q", "corpus"], project)
    run(["git", "add", "corpus.dvc", ".gitignore"], project)
    run(["git", "commit", "-q", "-m", "Track the corpus with DVC"], project)
    tracked = run(["dvc", "exp", "run", "--temp", "-n", "tiny-l1", "-S", "loss.pruning_weight=1e-07",
                   "-S", "report.experiments=true"], project)
    return {"project": project, "untracked": untracked, "tracked": tracked}


def test_temp_run_executes_its_workspace_code(temp_experiment):
    # `--temp` runs in a copy under .dvc/tmp/exps. An installed `samba` script would import the
    # package from where it was installed, so it would never print the copy's marker.
    assert temp_experiment["tracked"].stdout.count(WORKSPACE_MARKER) == 5  # One per stage.


def test_untracked_corpus_fails_early(temp_experiment):
    result = temp_experiment["untracked"]
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "corpus/train.txt is neither in git nor tracked by DVC" in output
    assert "dvc add corpus" in output
    assert "Running stage 'train_baseline'" not in output


def test_small_float_from_exp_run_is_float(temp_experiment):
    project = temp_experiment["project"]
    text = run(["git", "show", f"{exp_ref(project, 'tiny-l1')}:params.yaml"], project).stdout
    assert "pruning_weight: 1e-07" in text
    # PyYAML (YAML 1.1) reads this form as a string; the params loader (YAML 1.2) as a float.
    assert yaml.safe_load(text)["loss"]["pruning_weight"] == "1e-07"
    (project / "exp-params.yaml").write_text(text, encoding="utf-8")
    assert read_yaml(project / "exp-params.yaml")["loss"]["pruning_weight"] == 1e-07

    client = MlflowClient(tracking_uri(project))
    (parent,) = experiment_runs(client, EXPERIMENT_ROLE)
    assert parent.info.run_name == "tiny-l1"
    assert float(parent.data.params["loss.pruning_weight"]) == 1e-07
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    train = next(child for child in children if child.info.run_name == "train_samba")
    history = {key: sorted(client.get_metric_history(train.info.run_id, key), key=lambda m: m.step)
               for key in ("loss_total", "loss_main", "loss_readout", "loss_pruning")}
    assert len(history["loss_total"]) == 3
    # loss_total = main + α·readout + λ·pruning is true with λ = 1e-07, not with the profile's 0.1.
    for total, main, readout, pruning in zip(*history.values()):
        assert total.value == pytest.approx(main.value + 0.5 * readout.value + 1e-07 * pruning.value, rel=1e-5)
        assert total.value != pytest.approx(main.value + 0.5 * readout.value + 0.1 * pruning.value, rel=1e-5)


def test_temp_run_artifacts_under_repository(temp_experiment):
    project = temp_experiment["project"]
    client = MlflowClient(tracking_uri(project))
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    assert experiment.artifact_location == (project / "mlruns").resolve().as_uri()
    assert client.get_experiment("0").artifact_location.startswith((project / "mlruns").resolve().as_uri())
    assert list((project / ".dvc" / "tmp" / "exps").glob("**/tmp*/dvc.yaml")) == []
    (parent,) = experiment_runs(client, EXPERIMENT_ROLE)
    for name in SUMMARY_METRICS:
        assert name in parent.data.metrics, name
    trains = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'train_samba'")
    (train,) = trains
    artifacts = sorted(item.path for item in client.list_artifacts(train.info.run_id))
    assert artifacts == ["train_samba.csv", "train_samba.json"]
    assert (project / "mlruns" / train.info.run_id / "artifacts" / "train_samba.json").is_file()


def test_outputs_in_dvc_cache_not_git(temp_experiment):
    project = temp_experiment["project"]
    ref = exp_ref(project, "tiny-l1")
    files = run(["git", "ls-tree", "-r", "--name-only", ref], project).stdout.split()
    assert "dvc.lock" in files
    for folder in ("models/baseline/", "models/samba/", "data/tokens/", "corpus/"):
        assert not [name for name in files if name.startswith(folder)], folder
    lock = yaml.safe_load(run(["git", "show", f"{ref}:dvc.lock"], project).stdout)
    outs = {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}
    for path in ("models/samba", "models/baseline", "data/tokens"):
        digest = outs[path]
        assert digest.endswith(".dir"), (path, digest)
        cached = project / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]
        assert cached.is_file(), f"{path} is not in the DVC cache ({cached})"


def ref_files(project: Path, name: str) -> list[str]:
    return run(["git", "ls-tree", "-r", "--name-only", exp_ref(project, name)], project).stdout.split()


@pytest.fixture(scope="module")
def stage_comparison(temp_experiment) -> dict:
    """tiny-l1 applied to the workspace, then its report stage forced, so it compares all experiments.

    Only the report stage runs: `dvc exp apply` checks out tiny-l1's outputs and `--single-item`
    keeps `--force` from training again.
    """
    project = temp_experiment["project"]
    run(["dvc", "exp", "apply", "tiny-l1"], project)
    forced = run(["dvc", "repro", "--force", "--single-item", "report"], project)
    status = run(["dvc", "status"], project)
    return {"project": project, "forced": forced, "status": status}


def test_report_stage_skips_comparison_in_temp_run(temp_experiment):
    output = temp_experiment["tracked"].stdout + temp_experiment["tracked"].stderr
    assert "skipped the comparison of experiments" in output
    assert "temporary DVC workspace" in output
    files = ref_files(temp_experiment["project"], "tiny-l1")
    assert "reports/report.md" in files
    assert not [name for name in files if name.startswith("reports/experiments/")]


def test_report_stage_compares_experiments(stage_comparison):
    project = stage_comparison["project"]
    output = stage_comparison["forced"].stdout + stage_comparison["forced"].stderr
    assert "comparing 1 DVC experiment on the valid split" in output
    assert "new experiments do not rerun this stage" in output
    assert "Running stage 'train_samba'" not in output
    text = (project / "reports" / "experiments" / "experiments.md").read_text(encoding="utf-8")
    assert "| tiny-l1 |" in text
    for picture in ("pareto.png", "heatmaps.png"):
        assert (project / "reports" / "experiments" / picture).read_bytes().startswith(b"\x89PNG")
    assert "up to date" in stage_comparison["status"].stdout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_queue(project: Path, timeout_s: float) -> str:
    """Poll `dvc queue status` until no experiment is queued or running; return the last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = run(["dvc", "queue", "status"], project).stdout
        states = [line.split()[-1] for line in status.splitlines()[1:] if line.strip()
                  and not line.startswith("Worker")]
        if not {"Queued", "Running"} & set(states):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout_s:.0f} s:\n{status}"
        time.sleep(3)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own process group, stopped by that group's id."""

    def __init__(self, project: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1", "--backend-store-uri", tracking_uri(project),
                   "--default-artifact-root", (project / "mlruns").resolve().as_uri()]
        self.log = log_path.open("w", encoding="utf-8")
        self.process = subprocess.Popen(command, cwd=project, env=tool_env(), stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "mlflow server exited during startup"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        raise AssertionError(f"mlflow server not healthy after {timeout_s:.0f} s")

    def stop(self) -> None:
        # The server's uvicorn and job-runner children share the process group started above.
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.log.close()


def test_queued_sweep_in_mlflow_server_and_report(tiny_project: Path, tmp_path: Path):
    project = tiny_project
    assert not (project / "mlflow.db").exists()
    run(["dvc", "exp", "run", "--queue", "-S", "loss.pruning_weight=0.01,0.3", "-S", "loss.readout_weight=0.5"],
        project)
    try:
        run(["dvc", "queue", "start", "-j", "2"], project)
        status = wait_for_queue(project, timeout_s=900)
    finally:
        run(["dvc", "queue", "stop"], project, check=False, timeout=120)
    assert "Failed" not in status, status

    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    names = sorted(exp["name"] for baseline in shown for exp in baseline.get("experiments") or [])
    assert len(names) == 2, shown
    for name in names:  # report.experiments is false by default: no comparison in the report stage.
        files = ref_files(project, name)
        assert "reports/report.md" in files
        assert not [file for file in files if file.startswith("reports/experiments/")]

    server = MlflowServer(project, tmp_path / "mlflow-server.log")
    try:
        server.wait_healthy(timeout_s=120)
        client = MlflowClient(server.url)
        parents = experiment_runs(client, EXPERIMENT_ROLE)
        assert sorted(parent.info.run_name for parent in parents) == names
        weights = set()
        for parent in parents:
            assert parent.info.status == "FINISHED"
            assert parent.data.tags["dvc.experiment"] == parent.info.run_name
            for key in sweep_param_keys(project):
                assert key in parent.data.params, (parent.info.run_name, key)
            for key in SUMMARY_METRICS:
                assert key in parent.data.metrics, (parent.info.run_name, key)
            weights.add(parent.data.params["loss.pruning_weight"])
            children = client.search_runs([parent.info.experiment_id],
                                          filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
            by_name = {child.info.run_name: child for child in children}
            assert {"train_samba", "evaluate_samba"} <= set(by_name), sorted(by_name)
            artifacts = {item.path for item in client.list_artifacts(by_name["train_samba"].info.run_id)}
            assert artifacts == {"train_samba.csv", "train_samba.json"}
        assert weights == {"0.01", "0.3"}
    finally:
        server.stop()

    report = run(["samba", "report", "--experiments", "--out", "sweep"], project)
    assert "wrote sweep/experiments.md" in report.stdout
    text = (project / "sweep" / "experiments.md").read_text(encoding="utf-8")
    for name in names:
        assert f"| {name} |" in text
    for picture in ("pareto.png", "heatmaps.png"):
        assert (project / "sweep" / picture).read_bytes().startswith(b"\x89PNG")

    # dvc.yaml's plot definitions draw each training curve once per experiment.
    curves = json.loads(run(["dvc", "plots", "diff", "--json", *names], project).stdout)["data"]
    for plot in ("training_loss", "samba_readout_loss", "samba_pruning_loss"):
        (rendered,) = curves[plot]
        assert sorted(rendered["revisions"]) == names, plot
        assert {row["rev"] for row in rendered["content"]["data"]["values"]} == set(names), plot
