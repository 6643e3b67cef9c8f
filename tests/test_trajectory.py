"""analyze.py trajectory (sinkgpt.trajectory): a run's kept checkpoints in step order, each row the same numbers
`analyze.py report` and `analyze.py ablate` give for that checkpoint, a planted activation followed as it grows,
hub revisions read offline from a local Hugging Face cache, and bad input as one error line."""

import json
import os

import pytest
import torch

import analyze
from conftest import run_train
from sinkgpt.trajectory import trajectory_points
from test_analyze import META, PLANT_DIM, PLANT_LAYER, check_png, planted_model

TEXT = "abcdefgabcdefgabcdefgabc"  # the planted models' characters
RUN_TEXT = "To be, or not to be, that is the question:"  # the char run's (Hamlet's characters)


def cli(argv, capsys):
    code = analyze.main([str(a) for a in argv] + ["--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err):
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory, char_dataset):
    """A tiny char run that kept a checkpoint every 5 of its 20 steps (ckpt_0.pt ... ckpt_20.pt)."""
    out = tmp_path_factory.mktemp("kept") / "run"
    assert run_train(out, char_dataset, max_iters=20, eval_interval=10, keep_checkpoints=5) == 0
    return out


def test_a_run_folder_expands_to_its_kept_checkpoints_in_step_order(kept_run, tmp_path):
    points = trajectory_points([str(kept_run)])
    assert [p.step for p in points] == [0, 5, 10, 15, 20]  # 10 after 5, not in name order
    assert [os.path.basename(p.target) for p in points] == [f"ckpt_{s}.pt" for s in (0, 5, 10, 15, 20)]
    # listed checkpoints keep their order; a run folder without kept checkpoints is its ckpt.pt
    plain = tmp_path / "plain"
    os.makedirs(plain)
    torch.save({}, plain / "ckpt.pt")
    points = trajectory_points([str(kept_run / "ckpt_15.pt"), str(plain), str(kept_run / "ckpt_5.pt")])
    assert [p.target for p in points] == [str(kept_run / "ckpt_15.pt"), str(plain), str(kept_run / "ckpt_5.pt")]


def test_each_row_is_what_report_and_ablate_give_for_that_checkpoint(kept_run, tmp_path, capsys):
    code, out, err = cli(["trajectory", kept_run, "--text", RUN_TEXT, "--report", tmp_path / "traj"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "traj" / "trajectory.json").read_text())
    rows = result["points"]
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # the run learns: the points are different checkpoints
    for row in rows[1::2]:  # steps 5 and 15, measured on their own
        ckpt = kept_run / f"ckpt_{row['step']}.pt"
        assert cli(["report", ckpt, "--text", RUN_TEXT, "--report", tmp_path / "r"], capsys)[0] == 0
        report = json.loads((tmp_path / "r" / "report.json").read_text())
        value, position, dim = report["max_ratio"]["top"]
        assert (row["value"], row["position"], row["dim"]) == (value, position, dim)
        assert (row["layer"], row["ratio"], row["token"]) == (report["max_ratio"]["layer"],
                                                               report["max_ratio"]["ratio"], report["max_ratio"]["token"])
        assert row["sink_rate"] == report["sink_rate"] and row["loss"] == report["loss"]
        assert row["sun_hits"] == len(report["massive"])
        # zeroed where it first reaches half its value: the block outputs' top entries say which block that is
        assert cli(["ablate", ckpt, "--text", RUN_TEXT, "--entry", f"{row['ablated_layer']}:{position}:{dim}",
                    "--report", tmp_path / "a"], capsys)[0] == 0
        ablation = json.loads((tmp_path / "a" / "ablate.json").read_text())
        assert (row["delta_zero"], row["delta_mean"]) == (ablation["delta_zero"], ablation["delta_mean"])
    markdown = (tmp_path / "traj" / "trajectory.md").read_text()
    assert markdown.count("| ckpt_") == 5 and "![trajectory](trajectory.png)" in markdown
    assert out.count("| ckpt_") == 5  # printed as each point is measured
    check_png(tmp_path / "traj" / "trajectory.png")


def save_planted(value, step, path):
    model = planted_model(value)
    torch.save({"model": model.state_dict(), "model_args": model.config.to_dict(), "meta": META,
                "config": {"seed": 1337}, "iter_num": step}, path)
    return path


def test_a_planted_activation_is_followed_as_it_grows(tmp_path, capsys):
    """Three checkpoints of one model whose planted entry (position 0, PLANT_DIM, written in PLANT_LAYER) is 5,
    50 and 5000: the table finds it at each (where it is written, so that is where it is zeroed), and Sun et
    al.'s criterion flags only the last."""
    paths = [save_planted(value, step, tmp_path / f"p{step}.pt") for value, step in ((5.0, 0), (50.0, 100),
                                                                                     (5000.0, 200))]
    code, out, err = cli(["trajectory", *paths, "--text", TEXT, "--report", tmp_path / "traj"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "traj" / "trajectory.json").read_text())["points"]
    assert [r["step"] for r in rows] == [0, 100, 200]  # each checkpoint's own iter_num
    for row, planted in zip(rows[1:], (50.0, 5000.0)):
        assert (row["position"], row["dim"], row["ablated_layer"]) == (0, PLANT_DIM, PLANT_LAYER)
        assert row["value"] == pytest.approx(planted, rel=0.02) and row["token"] == "a"
    assert [r["sun_hits"] > 0 for r in rows] == [False, False, True]
    assert PLANT_LAYER in rows[2]["sun_layers"]
    # one probe sequence: the entry's mean is its own value, so setting it to the mean changes nothing, zeroing does
    assert rows[2]["delta_mean"] == 0.0 and rows[2]["delta_zero"] != 0.0


# ----------------------------------------------------------------------------------------------------
# hub revisions, offline: a local Hugging Face cache as snapshot_download leaves it


def fake_hub_cache(root, repo, revisions):
    """models--org--name/snapshots/<commit>/ (config.json + model.safetensors) and refs/<revision> -> <commit>
    for each revision: a tiny GPT-2 with its own seed per revision."""
    import transformers
    storage = root / ("models--" + repo.replace("/", "--"))
    for i, revision in enumerate(revisions):
        commit = f"{i + 1:040x}"
        torch.manual_seed(i)
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
        transformers.GPT2LMHeadModel(config).save_pretrained(storage / "snapshots" / commit)
        os.makedirs(storage / "refs", exist_ok=True)
        (storage / "refs" / revision).write_text(commit)
    return storage


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants
    root = tmp_path / "hub"
    storage = fake_hub_cache(root, "org/tiny-gpt2", ["step0", "step8"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return storage


def test_hub_revisions_are_read_through_the_hub_code_from_a_local_cache(hub_cache, tmp_path, capsys):
    text = "The cat sat on the mat. The dog sat on the log."
    code, out, err = cli(["trajectory", "org/tiny-gpt2", "--revisions", "step0,step8", "--text", text,
                          "--report", tmp_path / "traj"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "traj" / "trajectory.json").read_text())["points"]
    assert [(r["label"], r["revision"], r["step"]) for r in rows] == [("org/tiny-gpt2@step0", "step0", 0),
                                                                     ("org/tiny-gpt2@step8", "step8", 8)]
    for row, commit in zip(rows, (f"{1:040x}", f"{2:040x}")):  # each revision is its own snapshot's weights
        folder = hub_cache / "snapshots" / commit
        assert cli(["report", folder, "--text", text, "--report", tmp_path / "r"], capsys)[0] == 0
        report = json.loads((tmp_path / "r" / "report.json").read_text())
        assert row["value"] == report["max_ratio"]["top"][0] and row["sink_rate"] == report["sink_rate"]
    assert rows[0]["value"] != rows[1]["value"]


def test_pythia_style_revisions_give_a_trajectory(tmp_path, monkeypatch, capsys):
    """The pythia-70m command on a stand-in: a GPT-NeoX hub repo (parallel residual, partial rotary, its own
    tokenizer.json) with two revisions in the local cache, each its own weights, read through the hub code."""
    import huggingface_hub.constants
    from conftest import save
    from test_gpt_neox import make_pythia_folder, random_neox
    storage = tmp_path / "hub" / "models--EleutherAI--pythia-tiny"
    for i, revision in enumerate(("step0", "step1000")):
        commit = f"{i + 1:040x}"
        folder, _ = make_pythia_folder(storage / "snapshots" / commit)
        if i:  # a later revision: other weights, the same tokenizer
            save(random_neox(seed=20, vocab_size=320), folder)
        os.makedirs(storage / "refs", exist_ok=True)
        (storage / "refs" / revision).write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code, out, err = cli(["trajectory", "EleutherAI/pythia-tiny", "--revisions", "step0,step1000", "--text", RUN_TEXT,
                          "--report", tmp_path / "traj"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "traj" / "trajectory.json").read_text())["points"]
    assert [r["step"] for r in rows] == [0, 1000] and rows[0]["value"] != rows[1]["value"]


def test_from_pretrained_passes_the_revision_to_the_hub(hub_cache):
    from sinkgpt.pretrained import PretrainedError, from_pretrained
    for revision, commit in (("step0", 1), ("step8", 2)):
        fetched = from_pretrained("org/tiny-gpt2", revision=revision).state_dict()
        local = from_pretrained(str(hub_cache / "snapshots" / f"{commit:040x}")).state_dict()
        assert all(torch.equal(fetched[name], local[name]) for name in local), revision
    with pytest.raises(PretrainedError, match="applies to hub names only"):
        from_pretrained(str(hub_cache / "snapshots" / f"{1:040x}"), revision="step0")


def test_a_revision_that_does_not_exist_is_named_before_any_measurement(hub_cache, tmp_path, capsys):
    code, out, err = cli(["trajectory", "org/tiny-gpt2", "--revisions", "step0,step3,step8", "--text", "a b",
                          "--report", tmp_path / "traj"], capsys)
    line = one_error_line(code, err)
    assert "'step3'" in line and "org/tiny-gpt2" in line and "step0" not in line
    assert "| " not in out and not (tmp_path / "traj" / "trajectory.json").exists()


@pytest.mark.parametrize("argv, named", [
    (["trajectory", "--report", "{tmp}/t"], "no checkpoints given"),
    (["trajectory", "{tmp}/kept/ckpt_5.pt", "{tmp}/missing.pt", "--report", "{tmp}/t"], "missing.pt"),
    (["trajectory", "{tmp}/kept", "{tmp}/no/such/run", "--report", "{tmp}/t"], "no/such/run"),
    (["trajectory", "{tmp}/kept", "{tmp}", "--report", "{tmp}/t"], "holds no checkpoint"),  # a folder of folders
    (["trajectory", "{tmp}/kept", "--revisions", "step0", "--report", "{tmp}/t"], "one hub name"),
    (["trajectory", "org/a", "org/b", "--revisions", "step0", "--report", "{tmp}/t"], "one hub name"),
    (["trajectory", "org/a", "--revisions", ",", "--report", "{tmp}/t"], "--revisions is empty"),
    (["trajectory", "{tmp}/kept"], "--report"),
])
def test_bad_trajectory_input_is_one_error_line(tmp_path, capsys, argv, named):
    os.makedirs(tmp_path / "kept")
    save_planted(5.0, 5, tmp_path / "kept" / "ckpt_5.pt")
    code, out, err = cli([a.format(tmp=tmp_path) for a in argv], capsys)
    assert named in one_error_line(code, err)
    assert "| " not in out  # nothing measured before the error


def test_a_point_that_fails_keeps_the_points_measured_before_it(tmp_path, capsys):
    save_planted(5.0, 5, tmp_path / "ckpt_5.pt")
    save_planted(50.0, 10, tmp_path / "ckpt_10.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    code, out, err = cli(["trajectory", tmp_path / "ckpt_5.pt", tmp_path / "ckpt_10.pt", tmp_path / "notes.pt",
                          "--text", TEXT, "--report", tmp_path / "traj"], capsys)
    line = one_error_line(code, err)
    assert "notes.pt" in line and "the 2 points before it are in" in line
    rows = json.loads((tmp_path / "traj" / "trajectory.json").read_text())["points"]
    assert [r["step"] for r in rows] == [5, 10] and [r["label"] for r in rows] == [
        str(tmp_path / "ckpt_5.pt"), str(tmp_path / "ckpt_10.pt")]
    assert "| 10 |" in (tmp_path / "traj" / "trajectory.md").read_text()
    capsys.readouterr()
    code, out, err = cli(["trajectory", tmp_path / "notes.pt", "--text", TEXT, "--report", tmp_path / "t2"], capsys)
    assert "notes.pt" in one_error_line(code, err) and out == ""  # no table header without a row
