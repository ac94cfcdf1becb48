"""NetworkPolicy → nftables ruleset for one node: pure, so it tests without a kernel.

Shape (table `inet flock`, nothing else is ever touched):

* base chain `forward` (hook forward): `iifname vmap @egress` then `oifname vmap @ingress`.
  The maps hold one entry per *isolated* local pod, keyed by its host veth name
  (known before the veth exists, so rules can be in place before the pod is
  wired), jumping to that pod's chain. A pod that no policy isolates has no entry:
  its packets cost two hash lookups and nothing else.
* policy chains `eg_<digest>` / `in_<digest>`, named by a digest of their content,
  so local pods selected by the same policies (and, for ingress, declaring the
  same ports) share one: `ct state established,related` first (so conntrack
  appears only where a policy is in force), then one rule per (policy rule,
  family, protocol), ending in `drop`. The egress chain allows with `return`
  (not `accept`), so a same-node packet that passes the sender's egress is still
  checked against the receiver's ingress by the second vmap.
* peer sets: one named set per distinct (`from`/`to` list, family): a hash set of pod
  addresses, or, when the list has an ipBlock, an interval set of non-overlapping
  ranges (`except` already subtracted; pod addresses inside a block absorbed). A rule
  costs one set lookup whatever the number of pods it names.
* named ports: ingress names resolve per destination pod at compile time (the
  destination is the local pod). Egress names resolve per destination too, through
  a set `np_<name>_<proto>_<fam>` of `address . port` over every pod that declares
  that name. An unknown name matches nothing.
* fail closed: a policy that did not parse (`RejectedPolicy`) isolates what it may
  select in the directions it may cover and allows nothing.

Traffic between a pod and its own node passes through input/output, which we do
not hook: Kubernetes allows it whatever the policy.

Modules: `compiler` (the incremental `PolicyCompiler`: changes in, `Delta` out),
`sets` (set state with element journals, interval arithmetic), `render` (`Ruleset`,
`Delta` and the nft scripts: `render_full`, `render_delta`, `render_update`).
"""

from flock.compile.policy.compiler import (
    LocalPod,
    PolicyChanges,
    PolicyCompiler,
    PolicyInputs,
    compile_inputs,
    compile_ruleset,
)
from flock.compile.policy.render import (
    EGRESS_MAP,
    FAMILY,
    INGRESS_MAP,
    TABLE,
    ChainDef,
    Delta,
    NftSet,
    Ruleset,
    render_delta,
    render_full,
    render_update,
)

__all__ = [
    "EGRESS_MAP",
    "FAMILY",
    "INGRESS_MAP",
    "TABLE",
    "ChainDef",
    "Delta",
    "LocalPod",
    "NftSet",
    "PolicyChanges",
    "PolicyCompiler",
    "PolicyInputs",
    "Ruleset",
    "compile_inputs",
    "compile_ruleset",
    "render_delta",
    "render_full",
    "render_update",
]
