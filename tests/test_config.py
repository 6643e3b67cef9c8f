"""configurator.py: keys, types, the order of config files and flags, and train.py's one-line errors."""
import os

import pytest

from sinkgpt import config as configurator
from sinkgpt.config import DEFAULTS, ConfigError, load_config, model_config


def write(path, text):
    path.write_text(text)
    return str(path)


def test_defaults_are_gpt2_and_nanogpt():
    cfg = load_config([])
    assert cfg == DEFAULTS and cfg is not DEFAULTS
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"]) == (12, 12, 768, 1024)
    assert cfg["sink"] == "none" and cfg["attn_gate"] == "none" and cfg["attn_fn"] == "softmax"
    assert "vocab_size" not in cfg and "bos_token" not in cfg  # they come from the dataset


@pytest.mark.parametrize("flag,unknown,closest", [("--n_layers=3", "n_layers", "n_layer"),
                                                  ("--learning_rat=0.1", "learning_rat", "learning_rate"),
                                                  ("--batchsize=4", "batchsize", "batch_size"),
                                                  ("--snk=logit", "snk", "sink")])
def test_unknown_flag_names_the_key_and_the_closest(flag, unknown, closest):
    with pytest.raises(ConfigError) as info:
        load_config([flag])
    message = str(info.value)
    assert f"'{unknown}'" in message and f"'{closest}'" in message
    assert "\n" not in message


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path / "c.py", "n_embd = 64\nn_heads = 4\n")
    with pytest.raises(ConfigError) as info:
        load_config([path])
    assert "'n_heads'" in str(info.value) and "'n_head'" in str(info.value) and path in str(info.value)


def test_unknown_key_without_a_close_match():
    with pytest.raises(ConfigError, match="'zzzzzz'") as info:
        load_config(["--zzzzzz=1"])
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("flag,key", [("--batch_size=a", "batch_size"), ("--dropout=True", "dropout"),
                                      ("--n_layer=2.5", "n_layer"), ("--bias=1", "bias"),
                                      ("--learning_rate='fast'", "learning_rate"), ("--max_iters=True", "max_iters"),
                                      ("--compile=maybe", "compile"), ("--optimizer=adam", "optimizer"),
                                      ("--dtype=float64", "dtype")])
def test_wrong_type_or_value_names_the_key(flag, key):
    with pytest.raises(ConfigError) as info:
        load_config([flag])
    assert f"'{key}'" in str(info.value)


def test_wrong_type_in_a_file(tmp_path):
    with pytest.raises(ConfigError, match="'batch_size'"):
        load_config([write(tmp_path / "c.py", "batch_size = '12'\n")])


def test_int_is_accepted_for_float_and_literals_are_parsed():
    cfg = load_config(["--learning_rate=1", "--dropout=0", "--bias=False", "--compile=True", "--out_dir=123",
                       "--dataset=shakespeare_char", "--min_lr=1e-5", "--logit_softcap=30"])
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["dropout"] == 0.0 and isinstance(cfg["dropout"], float)
    assert cfg["bias"] is False and cfg["compile"] is True
    assert cfg["out_dir"] == "123"  # a string key keeps the text
    assert cfg["min_lr"] == 1e-5 and cfg["logit_softcap"] == 30.0
    assert load_config(["--compile=auto"])["compile"] == "auto"
    assert load_config(["--init_from='resume'"])["init_from"] == "resume"


def test_files_then_flags_in_order(tmp_path):
    base = write(tmp_path / "base.py", "batch_size = 4\nn_layer = 3\nout_dir = 'a'\nimport math\n"
                                        "_private = 5\ndef helper():\n    return 1\nn_embd = 2 ** 6\nn_head = 4\n")
    over = write(tmp_path / "over.py", "n_layer = 5\n")
    cfg = load_config([base, over, "--batch_size=8"])
    assert (cfg["batch_size"], cfg["n_layer"], cfg["out_dir"], cfg["n_embd"]) == (8, 5, "a", 64)
    # files apply in order, then flags in order: a flag wins over every file, wherever it stands
    assert load_config([base, "--n_layer=7"])["n_layer"] == 7
    assert load_config(["--n_layer=7", over])["n_layer"] == 7
    assert load_config(["--n_layer=7", base, "--n_layer=6", over])["n_layer"] == 6
    assert load_config([over, base])["n_layer"] == 3


def test_include_resolves_next_to_the_including_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.py", "batch_size = 4\nn_layer = 3\n")
    write(tmp_path / "sub" / "mid.py", "include('../base.py')\nn_layer = 4\n")
    top = write(tmp_path / "sub" / "top.py", "include('mid.py')\nbatch_size = 6\n")
    cfg = load_config([top])
    assert (cfg["batch_size"], cfg["n_layer"]) == (6, 4)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([write(tmp_path / "bad.py", "include('missing.py')\n")])


def test_include_from_two_folders(tmp_path):
    """A file including from a subfolder and then a sibling: the second include is relative to the including
    file, not to the subfolder of the first include."""
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "a.py", "n_layer = 3\n")
    write(tmp_path / "b.py", "batch_size = 5\n")
    top = write(tmp_path / "top.py", "include('sub/a.py')\ninclude('b.py')\n")
    cfg = load_config([top])
    assert (cfg["n_layer"], cfg["batch_size"]) == (3, 5)


def test_repository_config_files_load():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(configurator.__file__)))
    folder = os.path.join(repo, "config")
    # config/study/ holds study.py's plans (base config + variants), not train.py configs
    paths = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
             if name.endswith(".py") and os.path.relpath(root, folder).split(os.sep)[0] != "study"]
    assert paths
    for path in paths:
        cfg = load_config([path])
        model_config(cfg, vocab_size=65, bos_token=64)  # a valid model
    cfg = load_config([os.path.join(folder, "train_shakespeare_char.py")])
    assert (cfg["n_layer"], cfg["block_size"], cfg["dataset"]) == (4, 64, "shakespeare_char")


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([str(tmp_path / "nope.py")])
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        load_config([write(tmp_path / "boom.py", "batch_size = 1 // 0\n")])
    with pytest.raises(ConfigError, match="needs a value"):
        load_config(["--batch_size"])


@pytest.mark.parametrize("flag,key", [("--sink=sinky", "sink"), ("--attn_gate=both", "attn_gate"),
                                      ("--attn_fn=tanh", "attn_fn"), ("--pos_emb=alibi", "pos_emb"),
                                      ("--mlp_act=tanh", "mlp_act"), ("--rope_base=0", "rope_base"),
                                      ("--logit_softcap=-1", "logit_softcap"), ("--seed=-1", "seed"),
                                      ("--ddp_timeout=0", "ddp_timeout")])
def test_bad_model_option_is_an_error(flag, key):
    with pytest.raises(ConfigError) as info:
        load_config([flag])
    assert key in str(info.value)


@pytest.mark.parametrize("flag,key", [("--batch_size=0", "batch_size"), ("--n_layer=-1", "n_layer"),
                                      ("--max_iters=-5", "max_iters"), ("--eval_interval=0", "eval_interval"),
                                      ("--learning_rate=-1", "learning_rate"), ("--min_lr=-1e-5", "min_lr"),
                                      ("--weight_decay=-0.1", "weight_decay"), ("--grad_clip=-1", "grad_clip"),
                                      ("--dropout=1.0", "dropout"), ("--dropout=-0.1", "dropout")])
def test_out_of_range_values(flag, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config([flag])


def test_model_shape_errors_are_config_errors():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(["--n_embd=100", "--n_head=3"])


def test_model_config_takes_the_dataset_vocabulary():
    cfg = load_config(["--sink=logit", "--n_layer=2", "--n_head=2", "--n_embd=32"])
    mc = model_config(cfg, vocab_size=65, bos_token=64)
    assert (mc.vocab_size, mc.bos_token, mc.sink, mc.n_layer) == (65, 64, "logit", 2)


@pytest.mark.parametrize("argv,words", [(["--n_layers=2"], ["n_layers", "n_layer"]),
                                        (["--batch_size=a"], ["batch_size"]),
                                        (["--sink=bogus"], ["sink"])])
def test_train_main_prints_one_line_and_returns_1(capsys, tmp_path, argv, words):
    import train
    code = train.main(argv + [f"--out_dir={tmp_path / 'out'}"])
    assert code == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error:") and "Traceback" not in captured.err
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written for a bad config
