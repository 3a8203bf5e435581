import os

import pytest

from thaw.shim.node import config, config_schema


def test_defaults_when_default_file_missing(monkeypatch):
    monkeypatch.delenv("THAW_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", "/nonexistent/thaw.yaml")
    cfg = config.load()
    assert cfg.store_dir == "/var/lib/thaw" and cfg.next_runtime == "runc" and cfg.policy.verify == "stat"


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(config_schema.ConfigError):
        config.load(str(tmp_path / "nope.yaml"))


def test_values_and_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "c.yaml"
    p.write_text("store_dir: /s\nstate_dir: /t\nnext_runtime: /usr/bin/crun\npolicy:\n  verify: digest\n")
    cfg = config.load(str(p))
    assert (cfg.store_dir, cfg.state_dir, cfg.next_runtime, cfg.policy.verify) == ("/s", "/t", "/usr/bin/crun", "digest")
    assert sorted(os.listdir(tmp_path / "cache")) == sorted([_cache_name(p), "front." + _cache_name(p)])
    assert config.load(str(p)) == cfg           # served from the cache
    p.write_text("store_dir: /other\n")         # a changed file invalidates it
    assert config.load(str(p)).store_dir == "/other"


def _cache_name(p) -> str:
    return str(p).replace("%", "%25").replace("/", "%2F")


def test_front_settings_follow_the_config(tmp_path, monkeypatch):
    """The file thaw-runtime's C front reads (install/runtime-front.c): the config's key and its
    next_runtime and state_dir, rewritten whenever they differ, root-only."""
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "c.yaml"
    p.write_text("state_dir: /t\nnext_runtime: crun\n")
    front = tmp_path / "cache" / ("front." + _cache_name(p))

    def expected() -> str:
        st = os.stat(p)
        return f"thaw-runtime-front 1\nkey={st.st_mtime_ns}:{st.st_size}:{st.st_ino}\nnext_runtime=crun\nstate_dir=/t\n"
    config.load(str(p))
    assert front.read_text() == expected() and front.stat().st_mode & 0o777 == 0o600
    front.write_text("stale\n")
    config.load(str(p))                          # from the marshal cache: the front file is checked too
    assert front.read_text() == expected()
    p.write_text("state_dir: /t\nnext_runtime: crun\nlog_level: debug\n")
    config.load(str(p))
    assert front.read_text() == expected()
    p.write_text("next_runtime: \"cr\\nun\"\n")     # not expressible in its line format: none written
    front.unlink()
    config.load(str(p))
    assert not front.exists()


def test_the_config_cache_is_what_is_read(tmp_path, monkeypatch):
    """A warm cache is served without parsing the YAML (the hot path depends on it)."""
    import marshal
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "c.yaml"
    p.write_text("store_dir: /s\n")
    assert config.load(str(p)).store_dir == "/s"
    [cache] = [f for f in (tmp_path / "cache").iterdir() if not f.name.startswith("front.")]
    cached = marshal.loads(cache.read_bytes())
    cached["config"]["store_dir"] = "/from-the-cache"
    cache.write_bytes(marshal.dumps(cached))
    assert config.load(str(p)).store_dir == "/from-the-cache"


def test_policy_share_and_env(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "c.yaml"
    p.write_text("policy:\n  share: {base: [team-a], all: ['*']}\n  env_may_differ: [HOSTNAME, POD_IP]\n"
                 "  allow_cross_namespace: false\n")
    cfg = config.load(str(p))
    assert cfg.policy.readable_from("team-a") == ("base", "all")
    assert cfg.policy.readable_from("team-b") == ("all",)
    assert cfg.policy.readable_from("base") == ("all",)
    assert cfg.policy.env_may_differ == ("HOSTNAME", "POD_IP")
    assert config.load(str(p)) == cfg                    # the same from the cache


def test_policy_required_and_verify_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "c.yaml"
    p.write_text("policy:\n  required: true\n  verify: digest\n")
    for _ in ("parsed", "cached"):
        cfg = config.load(str(p))
        assert cfg.policy.required is True and cfg.policy.verify == "digest"
    p.write_text("store_dir: /s\n")
    assert config.load(str(p)).policy.required is False


@pytest.mark.parametrize("text", ["store_dir: relative\n", "bogus: 1\n", "policy:\n  verify: maybe\n",
                                  "policy:\n  allow_cross_namespace: true\n", "policy:\n  share: [a]\n",
                                  "policy:\n  share: {a: b}\n", "policy:\n  env_may_differ: HOSTNAME\n",
                                  "log_level: loud\n", "next_runtime: /usr/local/bin/thaw-runtime\n",
                                  "- a\n- b\n", "store_dir: [unclosed\n"])
def test_bad_configs(tmp_path, monkeypatch, text):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(config_schema.ConfigError):
        config.load(str(p))


def test_store_limits_defaults_values_and_the_cache(tmp_path, monkeypatch):
    import marshal
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "c.yaml"
    p.write_text("store_dir: /s\n")
    assert config.load(str(p)).store == config.StoreLimits(max_bytes=0, evict_unpushed=False)
    p.write_text("store:\n  max_bytes: 50000000000\n  evict_unpushed: true\n")
    parsed = config.load(str(p))
    assert (parsed.store.max_bytes, parsed.store.evict_unpushed, parsed.store_dir) == (50_000_000_000, True, "/var/lib/thaw")
    assert config.load(str(p)) == parsed                 # the same through the marshal cache
    [cache] = [f for f in (tmp_path / "cache").iterdir() if not f.name.startswith("front.")]
    cached = marshal.loads(cache.read_bytes())
    assert cached["config"]["store"] == {"max_bytes": 50_000_000_000, "evict_unpushed": True, "quota": {},
                                         "quota_share": 0.5}
    cached["config"]["store"]["max_bytes"] = 7                     # what is read is the cache
    cache.write_bytes(marshal.dumps(cached))
    assert config.load(str(p)).store.max_bytes == 7


def test_limits_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "c.yaml"
    p.write_text("store_dir: /s\n")
    cfg = config.load(str(p))
    assert (cfg.store.quota, cfg.store.quota_share) == ({}, 0.5)
    assert (cfg.registry.pull_deadline, cfg.registry.max_blobs, cfg.registry.max_manifest_bytes) == (1800, 10000, 4 << 20)
    p.write_text("store:\n  quota: {team-a: 1000, team-b: 0}\n  quota_share: 0.25\n"
                 "registry:\n  pull_deadline: 30\n  max_blobs: 5\n  max_manifest_bytes: 4096\n")
    for _ in range(2):                                   # parsed, then through the marshal cache
        cfg = config.load(str(p))
        assert (cfg.store.quota, cfg.store.quota_share) == ({"team-a": 1000, "team-b": 0}, 0.25)
        assert (cfg.registry.pull_deadline, cfg.registry.max_blobs, cfg.registry.max_manifest_bytes) == (30, 5, 4096)


@pytest.mark.parametrize("text", ["store:\n  max_bytes: -1\n", "store:\n  max_bytes: lots\n",
                                  "store:\n  max_bytes: true\n", "store:\n  max_bytes: 1.5\n",
                                  "store:\n  evict_unpushed: 1\n", "store:\n  evict_unpushed: 'yes'\n",
                                  "store:\n  bogus: 1\n", "store: [max_bytes]\n", "store: 10\n",
                                  "store:\n  quota: {a: -1}\n", "store:\n  quota: {a: lots}\n",
                                  "store:\n  quota: [a]\n", "store:\n  quota_share: 0\n",
                                  "store:\n  quota_share: 1.5\n", "registry:\n  pull_deadline: 0\n",
                                  "registry:\n  max_blobs: 0\n", "registry:\n  max_manifest_bytes: -5\n"])
def test_bad_store_limits(tmp_path, monkeypatch, text):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(config_schema.ConfigError, match="store"):
        config.load(str(p))


def test_the_shipped_config_documents_the_defaults(tmp_path, monkeypatch):
    """install/config.yaml names every section and key, each with its default value."""
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    shipped = config.load(os.path.join(os.path.dirname(__file__), "..", "install", "config.yaml"))
    assert config.dump(shipped) == config.dump(config.Config())
    text = open(os.path.join(os.path.dirname(__file__), "..", "install", "config.yaml")).read()
    assert "\nstore:\n  " in text and "  max_bytes: 0\n" in text and "  evict_unpushed: false\n" in text
