"""Credentials typed on the command line do not stay in Hydra's .hydra/*.yaml files."""

from __future__ import annotations

import json

import yaml

from clipforge.fault.secrets import MASK, scrub_hydra_files, scrub_override

SECRET = "sk-live-0123456789abcdef"


def test_scrub_override_masks_secret_keys_and_known_values():
    assert scrub_override(f"+logger.api_key={SECRET}", set()) == f"+logger.api_key={MASK}"
    assert scrub_override("trainer.max_steps=10", set()) == "trainer.max_steps=10"
    assert scrub_override("model.text.eot_token=3", set()) == "model.text.eot_token=3"
    joined = f"logger.api_key={SECRET},trainer.max_steps=10"
    assert scrub_override(joined, set()) == f"logger.api_key={MASK},trainer.max_steps=10"
    assert scrub_override(f"data.train_urls=pipe:curl -H {SECRET} x", {SECRET}) == (
        f"data.train_urls=pipe:curl -H {MASK} x"
    )


def test_scrub_hydra_files(tmp_path, monkeypatch):
    env_secret = "env-secret-value-42"
    monkeypatch.setenv("MY_SERVICE_TOKEN", env_secret)
    overrides = [f"+logger.api_key={SECRET}", "trainer.max_steps=10", f"data.header=Bearer {env_secret}"]
    (tmp_path / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {
        "logger": {"api_key": SECRET, "project": "p", "password": "${oc.env:DB_PASSWORD}"},
        "data": {"header": f"Bearer {env_secret}"},
        "model": {"text": {"eot_token": 49407}},
        "trainer": {"max_steps": 10},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    hydra_cfg = {
        "hydra": {
            "overrides": {"task": overrides},
            "job": {"override_dirname": ",".join(overrides), "name": "train"},
        }
    }
    (tmp_path / "hydra.yaml").write_text(yaml.safe_dump(hydra_cfg))

    changed = scrub_hydra_files(tmp_path, overrides)
    assert sorted(changed) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    for name in changed:
        text = (tmp_path / name).read_text()
        assert SECRET not in text and env_secret not in text, name
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["logger"] == {"api_key": MASK, "project": "p", "password": MASK}
    assert cfg["model"]["text"]["eot_token"] == 49407 and cfg["trainer"]["max_steps"] == 10
    assert yaml.safe_load((tmp_path / "overrides.yaml").read_text())[1] == "trainer.max_steps=10"
    assert scrub_hydra_files(tmp_path, overrides) == []  # idempotent
    assert scrub_hydra_files(tmp_path / "missing", overrides) == []


def test_zeroshot_cli_scrubs_its_hydra_dir(tmp_path, monkeypatch):
    from clipforge.eval import cli

    monkeypatch.setattr(cli, "run", lambda cfg: {})
    run_dir = tmp_path / "run"
    monkeypatch.setattr(
        "sys.argv",
        ["clipforge-zeroshot", "model=tiny", f"+wandb_api_key={SECRET}", f"hydra.run.dir={run_dir}"],
    )
    cli.main()
    texts = {p.name: p.read_text() for p in (run_dir / ".hydra").glob("*.yaml")}
    assert set(texts) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert all(SECRET not in t for t in texts.values()), json.dumps(texts)[:500]
    assert "model=tiny" in texts["overrides.yaml"]
