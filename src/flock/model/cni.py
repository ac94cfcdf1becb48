"""The plugin -> agent request, typed and checked, and the CNI error the agent answers with.

The plugin (flock.cni.plugin) already validated what the runtime gave it, but
the agent must not trust a socket peer: everything is checked again here, once,
so the CNI verbs in the agent work on typed values only. The wire format is
the RPC in docs/architecture.md.

`prev_result` is normalised to the 1.1.0 shape whatever cniVersion the runtime
used (0.3.x/0.4.0 results carry a per-IP ``version`` that 1.x dropped), so
CHECK compares like with like.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

from flock.cni.plugin import (
    ERR_ANNOTATION,
    ERR_CHECK,
    ERR_DATAPATH,
    ERR_DECODE,
    ERR_INCOMPATIBLE_VERSION,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_INVALID_NETNS,
    ERR_IO,
    ERR_IPAM,
    ERR_LIMITED_CONNECTIVITY,
    ERR_NOT_AVAILABLE,
    ERR_TRY_AGAIN,
    ERR_UNKNOWN_CONTAINER,
    ERR_UNSUPPORTED_FIELD,
    ifname_problem,
)
from flock.cni.plugin import valid_name as valid_cni_name
from flock.model.allocation import AttachmentKey

# The CNI error codes, flock's own (100-103) and the name validators are defined
# once, by the stdlib-only plugin (the leaf of the plugin <-> agent contract, which
# cannot import flock); re-exported here for the agent.
__all__ = [
    "COMMANDS",
    "ERR_ANNOTATION",
    "ERR_CHECK",
    "ERR_DATAPATH",
    "ERR_DECODE",
    "ERR_INCOMPATIBLE_VERSION",
    "ERR_INTERNAL",
    "ERR_INVALID_CONFIG",
    "ERR_INVALID_ENV",
    "ERR_INVALID_NETNS",
    "ERR_IO",
    "ERR_IPAM",
    "ERR_LIMITED_CONNECTIVITY",
    "ERR_NOT_AVAILABLE",
    "ERR_TRY_AGAIN",
    "ERR_UNKNOWN_CONTAINER",
    "ERR_UNSUPPORTED_FIELD",
    "CniError",
    "CniRequest",
    "Command",
    "ifname_problem",
    "normalise_result",
    "valid_cni_name",
]

Command = Literal["ADD", "DEL", "CHECK", "GC", "STATUS"]
COMMANDS: Final[tuple[Command, ...]] = ("ADD", "DEL", "CHECK", "GC", "STATUS")
# Per command, the attachment fields the request must carry (the spec's required env).
_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "ADD": ("containerID", "netns", "ifname"),
    "CHECK": ("containerID", "netns", "ifname"),
    "DEL": ("containerID", "ifname"),
}


class CniError(Exception):
    """A CNI verb failed. The agent replies ``{"error": {code, msg, details}}``.

    `msg` is short and names the thing that was wrong; `details` says what to do.
    """

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "msg": self.msg, "details": self.details}

    def reply(self) -> dict[str, Any]:
        return {"error": self.to_wire()}

    def __repr__(self) -> str:
        return f"CniError({self.code}, {self.msg!r}, {self.details!r})"


def _utf8(text: str) -> bool:
    """False for text holding lone surrogates (JSON can carry them; the kernel cannot)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def normalise_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """A CNI result of any supported version in the 1.1.0 shape (without cniVersion)."""
    out = {k: v for k, v in result.items() if k != "cniVersion"}
    ips = out.get("ips")
    if isinstance(ips, list):
        out["ips"] = [
            {k: v for k, v in ip.items() if k != "version"} if isinstance(ip, Mapping) else ip
            for ip in ips
        ]
    return out


@dataclass(frozen=True, slots=True)
class CniRequest:
    """One request from the plugin. Build it with `CniRequest.from_wire`."""

    command: Command
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    path: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    cni_version: str = "1.1.0"
    network: str = ""
    prev_result: Mapping[str, Any] | None = None
    # GC only: the attachments the runtime still has.
    valid_attachments: tuple[AttachmentKey, ...] = ()

    @property
    def key(self) -> AttachmentKey:
        return AttachmentKey(self.container_id, self.ifname)

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")

    def to_wire(self) -> dict[str, Any]:
        """The RPC request this was parsed from (config passed through unchanged)."""
        return {
            "command": self.command,
            "containerID": self.container_id,
            "netns": self.netns,
            "ifname": self.ifname,
            "args": dict(self.args),
            "path": self.path,
            "config": dict(self.config),
        }

    @classmethod
    def from_wire(cls, msg: object) -> CniRequest:
        """Check one decoded RPC request; CniError (with the CNI code) names what is wrong."""
        if not isinstance(msg, Mapping):
            raise CniError(ERR_DECODE, "RPC request is not a JSON object")
        command = msg.get("command")
        if command not in COMMANDS:
            raise CniError(
                ERR_INVALID_ENV,
                f"RPC request has unknown command {command!r}",
                f"expected one of {', '.join(COMMANDS)}",
            )
        strs: dict[str, str] = {}
        for key in ("containerID", "netns", "ifname", "path"):
            value = msg.get(key, "")
            if value is None:
                value = ""
            if not isinstance(value, str) or not _utf8(value):
                raise CniError(ERR_DECODE, f"RPC request field {key} must be a UTF-8 string")
            strs[key] = value
        missing = [k for k in _REQUIRED.get(command, ()) if not strs[k]]
        if missing:
            raise CniError(
                ERR_INVALID_ENV,
                f"{command} request lacks {', '.join(missing)}",
                "the runtime must set CNI_CONTAINERID, CNI_IFNAME (and CNI_NETNS for ADD/CHECK)",
            )
        if command in _REQUIRED:
            if not valid_cni_name(strs["containerID"]):
                raise CniError(ERR_INVALID_ENV, f"invalid containerID {strs['containerID']!r}")
            problem = ifname_problem(strs["ifname"])
            if problem:
                raise CniError(ERR_INVALID_ENV, f"invalid ifname {strs['ifname']!r}: {problem}")
        if strs["netns"] and not strs["netns"].startswith("/"):
            raise CniError(ERR_INVALID_NETNS, f"netns {strs['netns']!r} is not an absolute path")
        raw_args = msg.get("args") or {}
        if not isinstance(raw_args, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and _utf8(k) and _utf8(v)
            for k, v in raw_args.items()
        ):
            raise CniError(ERR_DECODE, "RPC request args must map strings to strings")
        config = msg.get("config")
        if not isinstance(config, Mapping):
            raise CniError(ERR_INVALID_CONFIG, "RPC request has no network config object")
        version = config.get("cniVersion")
        if not isinstance(version, str) or not version:
            raise CniError(ERR_INVALID_CONFIG, "network config has no cniVersion")
        name = config.get("name")
        if not isinstance(name, str) or not valid_cni_name(name):
            raise CniError(ERR_INVALID_CONFIG, f"network config name {name!r} is not valid")
        prev = config.get("prevResult")
        if prev is not None and not isinstance(prev, Mapping):
            raise CniError(ERR_INVALID_CONFIG, "network config prevResult must be an object")
        return cls(
            command=cast(Command, command),
            container_id=strs["containerID"],
            netns=strs["netns"],
            ifname=strs["ifname"],
            args=dict(raw_args),
            path=strs["path"],
            config=config,
            cni_version=version,
            network=name,
            prev_result=normalise_result(prev) if prev is not None else None,
            valid_attachments=_valid_attachments(config) if command == "GC" else (),
        )


def _valid_attachments(config: Mapping[str, Any]) -> tuple[AttachmentKey, ...]:
    raw = config.get("cni.dev/valid-attachments", [])
    if not isinstance(raw, list):
        raise CniError(ERR_INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    keys = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise CniError(ERR_INVALID_CONFIG, f"cni.dev/valid-attachments[{i}] is not an object")
        cid, ifname = item.get("containerID"), item.get("ifname")
        if not isinstance(cid, str) or not cid or not isinstance(ifname, str) or not ifname:
            raise CniError(
                ERR_INVALID_CONFIG,
                f"cni.dev/valid-attachments[{i}] needs string containerID and ifname",
                f"got {dict(item)!r}",
            )
        keys.append(AttachmentKey(cid, ifname))
    return tuple(keys)
