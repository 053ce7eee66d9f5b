"""A small certificate authority for tests, made with the openssl command line: CA
certificates, and server and client certificates it signs, valid now or for a period
already past (an expired certificate). EC P-256 keys, PKCS#8 PEM files."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Issued:
    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"openssl {' '.join(map(str, args))} failed:\n{r.stderr}", pytrace=False)


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


class CA:
    """A CA in `directory` (named `name`); its certificate is `self.cert`."""

    def __init__(self, directory: Path, name: str):
        self.dir = Path(directory) / name
        (self.dir / "newcerts").mkdir(parents=True, exist_ok=True)
        (self.dir / "index.txt").write_text("")
        (self.dir / "serial").write_text("1000\n")
        self.key = self.dir / "ca.key"
        self.cert = self.dir / "ca.pem"
        _key(self.key)
        _openssl("req", "-x509", "-new", "-key", self.key, "-out", self.cert, "-days", "2",
                 "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.config = self.dir / "ca.cnf"
        self.config.write_text(
            "[ca]\ndefault_ca = d\n[d]\n"
            f"database = {self.dir}/index.txt\nnew_certs_dir = {self.dir}/newcerts\n"
            f"serial = {self.dir}/serial\ndefault_md = sha256\npolicy = p\n"
            "unique_subject = no\ndefault_days = 2\n[p]\ncommonName = supplied\n")

    def issue(self, out: Path, name: str, sans: list[str], *, expired: bool = False) -> Issued:
        """A certificate for `sans` (`DNS:x`, `IP:y`), good for both server and client
        authentication, valid for two days from now, or (`expired`) during a month of
        2020."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        key, csr, cert = out / f"{name}.key", out / f"{name}.csr", out / f"{name}.pem"
        ext = out / f"{name}.ext"
        _key(key)
        _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={name}")
        ext.write_text(
            "basicConstraints = critical,CA:FALSE\n"
            "keyUsage = critical,digitalSignature\n"
            "extendedKeyUsage = serverAuth,clientAuth\n"
            f"subjectAltName = {','.join(sans)}\n")
        dates = (["-startdate", "20200101000000Z", "-enddate", "20200201000000Z"]
                 if expired else ["-days", "2"])
        _openssl("ca", "-batch", "-notext", "-config", self.config, "-cert", self.cert,
                 "-keyfile", self.key, "-in", csr, "-out", cert, "-extfile", ext, *dates)
        return Issued(cert, key)
