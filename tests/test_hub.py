"""train.push_to_hub / ogls-sd push against a local mock of huggingface_hub's HfApi (no network):
what is uploaded (the checkpoint's model/ as from_pretrained reads it, with its model card), when
the hub is checked (before any model is loaded), and that a failed upload loses nothing."""

import json
import shutil

import pytest
from typer.testing import CliRunner

import ogls_sd.hub as hub
from ogls_sd.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeHub:
    """Records calls; ``upload_folder`` copies the folder into ``store/<repo_id>``."""

    def __init__(self, store, user="me", fail_upload=False):
        self.store, self.user, self.fail_upload, self.calls = store, user, fail_upload, []

    def whoami(self):
        if self.user is None:
            raise RuntimeError("Invalid user token.")
        return {"name": self.user}

    def create_repo(self, repo_id, private=True, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, commit_message=""):
        if self.fail_upload:
            raise ConnectionError("connection reset by peer")
        self.calls.append(("upload_folder", folder_path, repo_id, commit_message))
        shutil.copytree(folder_path, self.store / repo_id, dirs_exist_ok=True)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "_api", lambda: fake)
    return fake


def test_train_pushes_the_final_checkpoint_with_a_model_card(tiny_cfg, fake_hub):
    from ogls_sd.trainer import train

    summ = train(tiny_cfg("train.push_to_hub=me/tiny-ogls", "eval.every=0"))
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[0][1:] == ("me/tiny-ogls", True, True)  # private by default, idempotent
    up = fake_hub.store / "me" / "tiny-ogls"
    assert fake_hub.calls[1][1] == str(__import__("pathlib").Path(summ["checkpoint"]) / "model")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= {p.name for p in up.iterdir()}
    card = (up / "README.md").read_text()
    assert "ogls-sd" in card and "ogls_sd" in card and "from `tiny`" in card and "accuracy before training" in card
    assert summ["pushed_to"] == "https://huggingface.co/me/tiny-ogls"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(up)  # what a user pulls loads


def test_hub_is_checked_before_any_model_is_loaded(tiny_cfg, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from ogls_sd.trainer import train

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE=1 is set"):
        train(tiny_cfg("train.push_to_hub=me/x"))
    assert not (tmp_path / "ws").exists()  # no warm start was built
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_api", lambda: FakeHub(tmp_path, user=None))
    with pytest.raises(hub.HubError, match="cannot use the hub.*Invalid user token.*huggingface-cli login"):
        train(tiny_cfg("train.push_to_hub=me/x"))
    assert not (tmp_path / "ws").exists()


def test_failed_upload_keeps_the_run_and_says_how_to_retry(tiny_cfg, tmp_path, fake_hub):
    from ogls_sd.trainer import train

    fake_hub.fail_upload = True
    with pytest.raises(hub.HubError, match=r"the checkpoint is kept; retry with `ogls-sd push .*step_000001 me/x`"):
        train(tiny_cfg("train.push_to_hub=me/x", "eval.every=0"))
    summ = json.loads((tmp_path / "run" / "summary.json").read_text())  # written before the upload
    assert summ["steps"] == 1 and "pushed_to" not in summ
    # retry from the command line
    fake_hub.fail_upload = False
    res = CliRunner().invoke(app, ["push", summ["checkpoint"], "me/x", "--public"])
    assert res.exit_code == 0, res.output
    assert fake_hub.calls[-2] == ("create_repo", "me/x", False, True)  # --public
    assert (fake_hub.store / "me" / "x" / "model.safetensors").is_file()


def test_push_refuses_a_directory_without_weights(tmp_path, fake_hub):
    res = CliRunner().invoke(app, ["push", str(tmp_path), "me/x"])
    assert res.exit_code == 1 and "is not a model directory" in res.output
