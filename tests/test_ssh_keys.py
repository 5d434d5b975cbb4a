"""SSH public keys: what is accepted, what is refused and why, and the fingerprint customers compare."""

import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from django.core.exceptions import ValidationError

from tenants.ssh import parse_public_key


def openssh(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.fixture(scope="module")
def ed25519_line():
    return openssh(ed25519.Ed25519PrivateKey.generate()) + " alice@laptop"


def test_ed25519_is_accepted_with_its_comment(ed25519_line):
    key = parse_public_key(ed25519_line)
    assert key.key_type == "ssh-ed25519" and key.bits == 256 and key.comment == "alice@laptop"
    assert key.fingerprint.startswith("SHA256:")


@pytest.mark.parametrize(("curve", "bits"), [(ec.SECP256R1(), 256), (ec.SECP384R1(), 384), (ec.SECP521R1(), 521)])
def test_ecdsa_curves_are_accepted(curve, bits):
    key = parse_public_key(openssh(ec.generate_private_key(curve)))
    assert key.key_type == f"ecdsa-sha2-nistp{bits}" and key.bits == bits


def test_rsa_2048_is_accepted_and_1024_refused_with_the_reason():
    assert parse_public_key(openssh(rsa.generate_private_key(public_exponent=65537, key_size=2048))).bits == 2048
    with pytest.raises(ValidationError, match="1024 bits; at least 2048"):
        parse_public_key(openssh(rsa.generate_private_key(public_exponent=65537, key_size=1024)))


def test_dsa_is_refused_with_advice():
    line = "ssh-dss AAAAB3NzaC1kc3MAAACBAP1/U4EddRIpUt9KnC7s5Of2EbdSPO9EAMMeP4C2USZpRV1AIlH7WT2NWPq old@box"
    with pytest.raises(ValidationError, match="DSA keys are no longer secure"):
        parse_public_key(line)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Paste your public key"),
        ("-----BEGIN OPENSSH PRIVATE KEY----- abc", "This is a private key"),
        ("ssh-ed25519", "a type and a base64 body"),
        ("ssh-foo AAAA", "Unsupported key type 'ssh-foo'"),
        ("ssh-ed25519 not-base64!!", "The key body is damaged"),
        ("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIA==", "The key body is damaged"),  # ed25519 blob labelled rsa
    ],
)
def test_bad_input_gets_a_message_a_person_can_act_on(text, message):
    with pytest.raises(ValidationError, match=message):
        parse_public_key(text)


def test_truncated_key_is_refused(ed25519_line):
    key_type, body, _comment = ed25519_line.split(" ", 2)
    with pytest.raises(ValidationError, match="damaged"):
        parse_public_key(f"{key_type} {body[:-8]}")


def test_fingerprint_matches_ssh_keygen(tmp_path, ed25519_line):
    path = tmp_path / "key.pub"
    path.write_text(ed25519_line + "\n")
    try:
        out = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        pytest.skip("ssh-keygen is not installed here")
    assert out.split()[1] == parse_public_key(ed25519_line).fingerprint
