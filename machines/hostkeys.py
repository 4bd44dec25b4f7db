"""A guest's SSH host keys as cloud-init prints them on the serial console at the instance's first boot
(its keys_to_console module, between `-----BEGIN SSH HOST KEY KEYS-----` and `-----END SSH HOST KEY KEYS-----`),
read strictly: what workflow runs check guests against."""

from __future__ import annotations

from portal import sshkeys

BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
END = "-----END SSH HOST KEY KEYS-----"
MAX_KEYS = 16  # cloud-init prints one line per host key type: a handful


def first_host_keys_block(log: str) -> list[str] | None:
    """The key lines of the FIRST block in `log`, each validated and normalised (comments dropped: the
    guest chose them); None when there is no complete first block, or when any line in it is not exactly
    one public key (a block interleaved with other output, or made up, is taken for nothing: never for the
    next block, which the guest itself may have printed later)."""
    lines = [line.strip() for line in log.replace("\r", "\n").split("\n")]
    try:
        start = lines.index(BEGIN)
    except ValueError:
        return None
    try:
        end = lines.index(END, start + 1)
    except ValueError:
        return None  # still being printed, or cut off: nothing yet
    keys: list[str] = []
    for line in lines[start + 1 : end]:
        if not line:
            continue  # "\r\n" line ends leave empty lines between the real ones
        if line == BEGIN:
            return None
        try:
            ktype, body, *_ = sshkeys.validate_ssh_key(line).split(" ")
        except sshkeys.InvalidSSHKey:
            return None
        keys.append(f"{ktype} {body}")
    if not keys or len(keys) > MAX_KEYS:
        return None
    return list(dict.fromkeys(keys))


def fingerprints(host_keys: str) -> list[sshkeys.KeyInfo]:
    """The stored host keys (one `type base64` line each) as `ssh-keygen -l` lists them, for the machine page."""
    return [sshkeys.describe(line) for line in host_keys.splitlines() if line.strip()]


def known_hosts(host_keys: str, *names: str) -> str:
    """known_hosts lines for these host names or addresses (what ansible's ssh checks the guest against)."""
    hosts = ",".join(dict.fromkeys(n for n in names if n))
    return "".join(f"{hosts} {line.strip()}\n" for line in host_keys.splitlines() if line.strip() and hosts)
