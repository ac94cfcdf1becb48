"""The msgspec records agree with the model's own parsers, and trim what they should.

`Pod.from_object` (the standalone datastore's parser) is the reference: a pod
decoded by the Kubernetes datastore's codec must be the same model object for
this node's pods, and the same minus annotations and images for other nodes'.
Watch lines decode to the right event kinds, and a NodeConfig status keeps its
condition's transition time while the condition's status does not change.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from flock.kube.records import namespace_codec, object_codec, pod_codec
from flock.kube.status import NodeStatusReport, PeerState, status_body
from flock.model.pod import Namespace, Pod

label_key = st.from_regex(r"[a-z]([a-z0-9.-]{0,10}/)?[a-z][a-z0-9_-]{0,10}", fullmatch=True)
label_val = st.from_regex(r"[a-zA-Z0-9_.-]{0,12}", fullmatch=True)
ips = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), st.just("not-an-ip"))
ports = st.fixed_dictionaries(
    {"containerPort": st.integers(1, 65535)},
    optional={
        "protocol": st.sampled_from(["TCP", "UDP", "SCTP"]),
        "name": st.from_regex(r"[a-z][a-z0-9-]{0,13}", fullmatch=True),
    },
)
containers = st.fixed_dictionaries(
    {"name": st.just("c")},
    optional={
        "image": st.text("abc:/.1", min_size=1, max_size=12),
        "ports": st.lists(ports, max_size=3),
    },
)


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": draw(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)),
        "namespace": draw(st.sampled_from(["default", "kube-system", "team-a"])),
        "uid": draw(st.uuids()).hex,
        "resourceVersion": str(draw(st.integers(1, 10**9))),
        "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
    }
    if draw(st.booleans()):
        meta["labels"] = draw(st.dictionaries(label_key, label_val, max_size=4))
    if draw(st.booleans()):
        meta["annotations"] = draw(st.dictionaries(label_key, st.text(max_size=20), max_size=3))
    if draw(st.booleans()):
        meta["deletionTimestamp"] = "2026-12-03T10:00:00Z"
    spec: dict[str, Any] = {
        "nodeName": draw(st.sampled_from(["me", "other", ""])),
        "containers": draw(st.lists(containers, max_size=3)),
        "volumes": [{"name": "v", "emptyDir": {}}],
    }
    if draw(st.booleans()):
        spec["hostNetwork"] = draw(st.booleans())
    conds = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "type": st.sampled_from(["Ready", "PodScheduled", "ContainersReady"]),
                    "status": st.sampled_from(["True", "False", "Unknown"]),
                }
            ),
            max_size=3,
        )
    )
    status = {
        "phase": "Running",
        "conditions": conds,
        "podIPs": [{"ip": ip} for ip in draw(st.lists(ips, max_size=2))],
        "containerStatuses": [{"name": "c", "ready": True}],
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def _list(*items: dict[str, Any]) -> bytes:
    return json.dumps(
        {"metadata": {"resourceVersion": "77", "continue": "tok"}, "items": list(items)}
    ).encode()


@given(obj=pods())
def test_pod_record_equals_the_model_parser(obj: dict[str, Any]) -> None:
    items, rv, cont = pod_codec("me").decode_list(_list(obj))
    assert (rv, cont) == ("77", "tok")
    (item,) = items
    ref = Pod.from_object(obj)
    assert item.uid == obj["metadata"]["uid"]
    assert item.resource_version == obj["metadata"]["resourceVersion"]
    assert item.key == (ref.namespace, ref.name)
    if ref.node_name == "me":
        assert item.value == ref
    else:
        trimmed = Pod(
            namespace=ref.namespace,
            name=ref.name,
            uid=ref.uid,
            node_name=ref.node_name,
            labels=ref.labels,
            container_ports=ref.container_ports,
            ready=ref.ready,
            terminating=ref.terminating,
            host_network=ref.host_network,
            ips=ref.ips,
        )
        assert item.value == trimmed


def test_watch_lines_decode_to_events() -> None:
    c = namespace_codec()
    obj = {"metadata": {"name": "team-a", "resourceVersion": "9", "labels": {"x": "1"}}}
    ev = c.decode_event(json.dumps({"type": "MODIFIED", "object": obj}).encode())
    assert ev.type == "MODIFIED" and ev.resource_version == "9" and ev.item is not None
    assert ev.item.value == Namespace("team-a", {"x": "1", "kubernetes.io/metadata.name": "team-a"})
    bm = {
        "type": "BOOKMARK",
        "object": {"kind": "Namespace", "metadata": {"resourceVersion": "12"}},
    }
    ev = c.decode_event(json.dumps(bm).encode())
    assert (ev.type, ev.item, ev.resource_version) == ("BOOKMARK", None, "12")
    err = {
        "type": "ERROR",
        "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"},
    }
    ev = c.decode_event(json.dumps(err).encode())
    assert ev.status is not None and ev.status.code == 410 and ev.item is None


def test_object_records_keep_the_shape_the_parsers_read() -> None:
    np = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "a", "resourceVersion": "3", "uid": "u"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    item = object_codec().decode_object(json.dumps(np).encode())
    assert item.value == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "a", "uid": "u"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }


def test_status_keeps_transition_time_until_the_condition_flips() -> None:
    up = NodeStatusReport(
        True, "AgentReady", "ok", "0.1.0", (PeerState("192.0.2.1", 1, "Established"),)
    )
    first = status_body(up, None, 1000.0)
    again = status_body(up, first, 2000.0)
    assert again == first, "nothing changed: the same status (no write)"
    down = NodeStatusReport(
        True, "AgentReady", "ok", "0.1.0", (PeerState("192.0.2.1", 1, "Active"),)
    )
    flipped = status_body(down, first, 3000.0)
    conds = {c["type"]: c for c in flipped["conditions"]}
    assert conds["Ready"]["lastTransitionTime"] == first["conditions"][0]["lastTransitionTime"]
    assert conds["BGPSessionsEstablished"]["status"] == "False"
    assert (
        conds["BGPSessionsEstablished"]["lastTransitionTime"]
        != (first["conditions"][1]["lastTransitionTime"])
    )
    assert flipped["bgp"]["sessions"] == "0/1"


def test_relist_reuses_cached_items_at_the_same_resource_version() -> None:
    a = {"metadata": {"name": "a", "namespace": "n", "uid": "1", "resourceVersion": "5"}}
    b = {"metadata": {"name": "b", "namespace": "n", "uid": "2", "resourceVersion": "6"}}
    codec = pod_codec("me")
    first, _, _ = codec.decode_list(_list(a, b))
    cached = {i.key: i for i in first}
    b2 = {"metadata": {**b["metadata"], "resourceVersion": "7"}}
    again, _, _ = codec.decode_list(_list(a, b2), cached)
    assert again[0] is first[0], "same resourceVersion: the cached item, not a new one"
    assert again[1] is not first[1] and again[1].resource_version == "7"
    a_new_uid = {"metadata": {**a["metadata"], "uid": "9"}}
    third, _, _ = codec.decode_list(_list(a_new_uid), cached)
    assert third[0] is not first[0] and third[0].uid == "9"
