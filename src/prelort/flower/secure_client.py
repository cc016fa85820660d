"""The client side of secure aggregation (``prelort.flower.secure``): imports only Flower.

``secure_mod`` is a ClientApp mod: a TRAIN message that carries SecAgg+'s config record goes
through Flower's ``secaggplus_mod`` (setup, share keys, collect masked vectors, unmask);
any other message passes through untouched. In the collect stage the ClientApp trains as
usual and ``sum_reply`` turns the result into the padded sum-form vector (docs/design.md
§4.9) in the legacy ``FitRes`` shape the mod quantizes and masks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

if TYPE_CHECKING:
    from prelort.federation.core import ClientResult
    from prelort.federation.plan import RunPlan

SUM_ROWS = "sum-rows"
"""CONFIG entry of a secure TRAIN message: the rank rows to send (the rest as zeros)."""
CONFIG = "config"
"""``prelort.flower.records.CONFIG`` (not imported: records imports torch)."""


def secure_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for TRAIN messages of a SecAgg+ round; others pass through."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def is_secure(content: RecordDict) -> bool:
    """Whether a TRAIN content asks for a sum-form reply (a SecAgg+ collect stage)."""
    return CONFIG in content.config_records and SUM_ROWS in content.config_records[CONFIG]


def sum_reply(
    content: RecordDict, plan: RunPlan, client_id: int, received: Any, res: ClientResult
) -> RecordDict:
    """The padded delta-form vector of ``res`` as a legacy FitRes for ``secaggplus_mod``:
    ``num_examples`` 1 (SecAgg+ scales nothing and the server learns no n_k; the client's
    weight is inside the vector) and only the data-independent pass count in the clear."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from prelort.aggregation.sumform import client_sums
    from prelort.flower.records import as_int

    privacy = plan.privacy
    if privacy is None or not privacy.secure:
        raise ValueError("a secure-aggregation message for a run without privacy.secure_aggregation")
    rows = as_int(content.config_records[CONFIG][SUM_ROWS], SUM_ROWS)
    weight = privacy.weight(res.update.num_examples, secagg=True)
    vector = client_sums(res.update, plan.max_rank, weight, reference=received, rows=rows)
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(vector.to_arrays()),
        num_examples=1,
        metrics={"client-id": client_id, "passes": res.stats.passes},
    )
    out: RecordDict = compat.fitres_to_recorddict(fitres, keep_input=False)
    return out
