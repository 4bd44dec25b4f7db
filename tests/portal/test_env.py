import pytest
from django.core.exceptions import ImproperlyConfigured

from portal.env import envbool, envint, envlist, envsecret


def test_envbool(monkeypatch):
    monkeypatch.setenv("X", "yes")
    assert envbool("X", "false") is True
    monkeypatch.setenv("X", "0")
    assert envbool("X", "true") is False
    monkeypatch.delenv("X")
    assert envbool("X", "true") is True


def test_envbool_refuses_nonsense(monkeypatch):
    monkeypatch.setenv("X", "maybe")
    with pytest.raises(ImproperlyConfigured, match="X must be true or false"):
        envbool("X", "false")


def test_envint(monkeypatch):
    monkeypatch.setenv("N", " 42 ")
    assert envint("N", "1") == 42
    monkeypatch.setenv("N", "forty")
    with pytest.raises(ImproperlyConfigured, match="N must be an integer"):
        envint("N", "1")


def test_envlist(monkeypatch):
    monkeypatch.setenv("L", "a, b,,c ")
    assert envlist("L", "") == ["a", "b", "c"]


def test_envsecret_reads_the_file(monkeypatch, tmp_path):
    (tmp_path / "s").write_text("s3cret\n")
    monkeypatch.setenv("S_FILE", str(tmp_path / "s"))
    assert envsecret("S", "default") == "s3cret"


def test_envsecret_missing_file_is_loud(monkeypatch, tmp_path):
    monkeypatch.setenv("S_FILE", str(tmp_path / "missing"))
    with pytest.raises(ImproperlyConfigured, match="S_FILE: cannot read"):
        envsecret("S", "default")


def test_envsecret_falls_back(monkeypatch):
    monkeypatch.delenv("S_FILE", raising=False)
    monkeypatch.setenv("S", "plain")
    assert envsecret("S", "default") == "plain"
