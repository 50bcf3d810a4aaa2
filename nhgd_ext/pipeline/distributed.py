"""``transport="distributed"``: the pipeline's messages over ``torch.distributed``
to a consumer process that owns the curvature (gloo on CPU, NCCL on GPUs).

Producer process::

    with Pipeline(None, transport="distributed", consumer_rank=1) as pipe:
        for step in ...:
            pipe.push(grad, batch_size=B)     # returns at once; a sender thread sends
        w = pipe.solve(v)                     # answered by the consumer

Consumer process::

    serve(DenseEFIM(d, dtype=torch.float64), producer_rank=0)   # returns at the producer's close()

K-FAC: the consumer serves ``KFAC(replica)`` (a model with the same layers,
never run there); the producer gives ``recorder=KFAC(model)``, whose hooks
record each step's layer inputs and output gradients, sent with the push.

The producer side is the local engine whose consumer thread *sends* each
message instead of applying it, so ``push`` keeps its semantics (copy, return,
block only on full slots). While more messages wait behind the one being
sent, the sender packs them into one batch (up to ``_BATCH_MESSAGES``): a
link slower than the producer then pays its per-send latency once per batch
(a gloo send between two processes costs about 0.4 ms on a 2-vCPU VM,
more than an update). A message with nothing behind it goes at once, so
none waits for the next push; the consumer applies a batch's messages one
by one, in order, exactly as if they had come singly. Traffic is one-way
except for requests (solve, flush of the count, close), which the consumer
answers. An error in the consumer's update is reported in the answer to the
producer's next request (``flush``/``solve``/``num_updates``/``close``) and,
over gloo, also at once on a side channel (its own tag, received by a
waiting thread) that the producer's sender checks before every send, so the
pushes after it arrives raise too (NCCL has no tags: there the error waits
for the next request). The producer's error (``abort``, or an exception
leaving its ``with`` block) makes ``serve`` raise; a producer process that
dies makes ``serve`` raise when the connection drops.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.distributed as dist

from ._messages import UPDATE, UPDATE_MANY, Message, PipelineError, apply_update

# ops on the wire
_HELLO, _SOLVE, _RESET, _NUM_UPDATES, _INVERSE, _CLOSE, _ABORT, _BATCH = 10, 11, 12, 13, 14, 15, 16, 17
_REQUESTS = {"solve": _SOLVE, "reset": _RESET, "num_updates": _NUM_UPDATES, "inverse": _INVERSE, "close": _CLOSE}
_OK, _ERROR = 0, 1
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int64]
_MAX_DIMS = 2
_TENSOR_FIELDS = 2 + _MAX_DIMS  # dtype, ndim, sizes (zero-padded)
# A message sent on its own: a fixed header (op/status, a, b, n, then the
# fields of each tensor) and at most _MAX_TENSORS tensors. One with more (a
# K-FAC step's captured layer inputs and output gradients) goes as a batch.
_MAX_TENSORS = 2
_HEADER = 4 + _MAX_TENSORS * _TENSOR_FIELDS
# A batch: tensors [index (int64), payload (uint8)], a = its message count. The
# index holds per message its description (as a header, but only as long as its
# tensors need), then each tensor's byte offset in the payload; the payload
# the tensors' bytes.
_BATCH_MESSAGES, _BATCH_BYTES = 64, 1 << 24
# The side channel: exactly one notice per pipeline, the consumer's error as
# soon as an update fails, else an empty one when the stream ends.
_NOTICE_TAG, _NOTICE_BYTES = 7, 2048


def _wire_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_wire_tensors(name: str, tensors) -> None:
    """Refuses, before anything is queued, a tensor the wire cannot carry."""
    for t in tensors:
        if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
            raise ValueError(f"Pipeline.push: with transport='distributed', '{name}' tensors must have at most "
                             f"{_MAX_DIMS} dimensions and one of the dtypes {', '.join(map(str, _DTYPES))}; "
                             f"got {t.dtype} of shape {list(t.shape)}")


def _describe(op: int, a: int, b: int, tensors) -> list[int]:
    """[op, a, b, n, then dtype, ndim and the zero-padded sizes of each tensor]."""
    fields = [op, a, b, len(tensors)]
    for t in tensors:
        fields += [_DTYPES.index(t.dtype), t.dim(), *t.shape, *[0] * (_MAX_DIMS - t.dim())]
    return fields


def _header(op: int, a: int, b: int, tensors) -> list[int]:
    """A single message's header (_HEADER integers)."""
    if len(tensors) > _MAX_TENSORS:
        raise ValueError(f"Pipeline: a message sent on its own holds at most {_MAX_TENSORS} tensors")
    fields = _describe(op, a, b, tensors)
    return fields + [0] * (_HEADER - len(fields))


def _layouts(header: list[int]) -> list[tuple[torch.dtype, list[int]]]:
    """(dtype, shape) of each tensor a header (or a batch's description) describes."""
    fields = (header[4 + i * _TENSOR_FIELDS:4 + (i + 1) * _TENSOR_FIELDS] for i in range(header[3]))
    return [(_DTYPES[f[0]], f[2:2 + f[1]]) for f in fields]


def _send(op: int, a: int, b: int, tensors, peer: int, group, wire: torch.device) -> None:
    dist.send(torch.tensor(_header(op, a, b, tensors), dtype=torch.int64).to(wire), peer, group=group)
    for t in tensors:
        dist.send(t.contiguous().to(wire), peer, group=group)


def _recv(peer: int, group, wire: torch.device):
    header = torch.empty(_HEADER, dtype=torch.int64, device=wire)
    dist.recv(header, peer, group=group)
    h = header.tolist()
    tensors = []
    for dtype, shape in _layouts(h):
        t = torch.empty(shape, dtype=dtype, device=wire)
        dist.recv(t, peer, group=group)
        tensors.append(t)
    return h[0], h[1], h[2], tensors


def _pack(messages) -> list[torch.Tensor]:
    """[index, payload] of a batch of (op, a, b, tensors) messages. Every
    tensor starts at a multiple of 8 bytes, so each is a view of the payload."""
    index, chunks, offset = [], [], 0
    for op, a, b, tensors in messages:
        offsets = []
        for t in tensors:
            data = t.detach().contiguous().view(-1).view(torch.uint8)
            offsets.append(offset)
            padding = -data.numel() % 8
            chunks += [data, torch.zeros(padding, dtype=torch.uint8, device=data.device)] if padding else [data]
            offset += data.numel() + padding
        index += _describe(op, a, b, tensors) + offsets
    return [torch.tensor(index, dtype=torch.int64), torch.cat(chunks) if chunks else torch.zeros(1, dtype=torch.uint8)]


def _unpack(count: int, index: torch.Tensor, payload: torch.Tensor):
    """The (op, a, b, tensors) messages of a batch, in order (views of payload)."""
    fields, start = index.tolist(), 0
    for _ in range(count):
        n = fields[start + 3]
        offsets_at = start + 4 + n * _TENSOR_FIELDS
        tensors = []
        for (dtype, shape), offset in zip(_layouts(fields[start:offsets_at]), fields[offsets_at:offsets_at + n]):
            nbytes = dtype.itemsize * math.prod(shape)
            tensors.append(payload[offset:offset + nbytes].view(dtype).view(shape))
        yield fields[start], fields[start + 1], fields[start + 2], tensors
        start = offsets_at + n


def _text(message: str) -> torch.Tensor:
    return torch.tensor(list(message.encode()) or [32], dtype=torch.uint8)


def _untext(t: torch.Tensor) -> str:
    return bytes(t.cpu().tolist()).decode(errors="replace")


def _notice(message: str) -> torch.Tensor:
    """[length (2 bytes), utf-8 text...], zero-padded to _NOTICE_BYTES."""
    data = message.encode()[: _NOTICE_BYTES - 2]
    out = torch.zeros(_NOTICE_BYTES, dtype=torch.uint8)
    out[:2] = torch.tensor([len(data) >> 8, len(data) & 255], dtype=torch.uint8)
    if data:
        out[2:2 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return out


def _unnotice(t: torch.Tensor) -> str:
    length = int(t[0]) << 8 | int(t[1])
    return _untext(t[2:2 + length])


def _has_tags(group) -> bool:
    return dist.get_backend(group) == "gloo"


def _global_rank(rank: int, group) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class RemoteConsumer:
    """The producer's side of the link (used by :class:`Pipeline`)."""

    def __init__(self, producer: torch.device, consumer_rank: int, group):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("Pipeline: transport='distributed' needs torch.distributed initialized "
                             "(torchrun, or dist.init_process_group) in both processes")
        if consumer_rank == dist.get_rank(group):
            raise ValueError(f"Pipeline: argument 'consumer_rank' is this process's own rank ({consumer_rank})")
        self.group, self.peer = group, _global_rank(consumer_rank, group)
        self.wire = _wire_device(group)
        if self.wire.type == "cuda" and producer.type == "cuda":
            self.sender_device = producer
        else:
            self.sender_device = torch.device("cpu") if self.wire.type == "cpu" else self.wire
        self.done = False
        self._batch, self._batch_bytes = [], 0  # messages held while more wait behind them
        self.batches_sent = 0
        _, dim, flags, _ = self._exchange(_HELLO, 0, [])
        # dim 0: the consumer's curvature did not say
        self.dim, self.has_cross_handler, self.takes_rows = dim or None, bool(flags & 1), bool(flags & 2)
        self.dtype = _DTYPES[flags >> 8] if flags >> 8 < len(_DTYPES) else None
        self.consumer_device = torch.device("cpu")  # the remote curvature's device is not ours to use
        self._notice, self._listener = None, None
        self._noticed = threading.Event()
        if _has_tags(group):
            # gloo's receive cannot be polled (is_completed stays False until a
            # wait, and a wait that times out breaks the connection): a thread waits
            self._notice = torch.zeros(_NOTICE_BYTES, dtype=torch.uint8)
            work = dist.irecv(self._notice, src=self.peer, group=group, tag=_NOTICE_TAG)
            self._listener = threading.Thread(target=self._listen, args=(work,), name="nhgd-notice", daemon=True)
            self._listener.start()

    def _listen(self, work) -> None:
        try:
            work.wait()
        except Exception:  # noqa: BLE001 - the connection dropped: the main channel reports it
            self._notice = None
        self._noticed.set()

    def _raise_if_consumer_failed(self) -> None:
        if self._noticed.is_set() and self._notice is not None:
            text = _unnotice(self._notice)
            if text:
                raise PipelineError(f"Pipeline consumer (rank {self.peer}): {text}")

    def send_update(self, tensors, message: Message, more_queued: bool = False) -> None:
        """Sends one message, or holds it for a batch while ``more_queued``
        (more messages wait behind it in the engine). Its captures count is
        not sent: the consumer counts the tensors after the gradient and the
        cross term."""
        self._raise_if_consumer_failed()
        framed = (*message.encode()[:3], tensors)  # (op, a, b, tensors) on the wire
        if not more_queued and not self._batch and len(tensors) <= _MAX_TENSORS:
            _send(*framed, self.peer, self.group, self.wire)
            return
        self._batch.append(framed)
        self._batch_bytes += sum(t.numel() * t.element_size() for t in tensors)
        if not more_queued or len(self._batch) >= _BATCH_MESSAGES or self._batch_bytes >= _BATCH_BYTES:
            self._send_batch()

    def _send_batch(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            if len(batch) == 1 and len(batch[0][3]) <= _MAX_TENSORS:
                _send(*batch[0], self.peer, self.group, self.wire)
            else:
                _send(_BATCH, len(batch), 0, _pack(batch), self.peer, self.group, self.wire)
                self.batches_sent += 1

    def request(self, what: str, argument):
        op = _REQUESTS.get(what)
        if op is None:
            raise ValueError(f"Pipeline: {what} is not available over transport='distributed'")
        tensors = [argument] if what == "solve" else []
        _, value, _, result = self._exchange(op, 0, tensors)
        if what == "close":
            self.done = True
            self._end_notices()
        if what in ("solve", "inverse"):
            return result[0]
        return value if what == "num_updates" else None

    def send_abort(self, reason: str) -> None:
        if not self.done:
            self.done = True
            try:
                _send(_ABORT, 0, 0, [_text(reason)], self.peer, self.group, self.wire)
            except Exception:  # noqa: BLE001 - the consumer may be gone already
                return
            self._end_notices()

    def _end_notices(self) -> None:
        """Waits for the side channel's notice (sent before the consumer answers
        a close or stops on an abort), so no receive outlives the pipeline."""
        if self._listener is not None:
            self._listener.join(timeout=30)
            self._listener = None

    def finish(self, failed: bool) -> None:
        if not self.done:
            self.send_abort("the producer closed the pipeline without draining it" if not failed
                            else "the stream failed")

    def _exchange(self, op: int, a: int, tensors):
        self._send_batch()  # a request comes after every message pushed before it
        _send(op, a, 0, tensors, self.peer, self.group, self.wire)
        status, x, y, result = _recv(self.peer, self.group, self.wire)
        if status != _OK:  # the consumer reported its failure; it drains until our abort
            raise PipelineError(f"Pipeline consumer (rank {self.peer}): {_untext(result[0])}")
        return status, x, y, result


def serve(curvature, *, producer_rank: int = 0, group=None, on_cross=None) -> dict:
    """Runs the consumer of a ``transport="distributed"`` pipeline in this
    process until the producer closes it: applies every message to
    ``curvature`` (in order, with the same calls as the local transport) and
    answers the producer's requests. Returns ``{"messages", "num_updates"}``.
    Raises :class:`PipelineError` if the producer aborted, the connection
    dropped, or an update failed here (after telling the producer)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("serve: torch.distributed must be initialized (torchrun, or dist.init_process_group)")
    peer, wire = _global_rank(producer_rank, group), _wire_device(group)
    notice_pending = _has_tags(group)

    def notify(message: str) -> None:
        """The side channel's one notice (the producer posted its receive at start)."""
        nonlocal notice_pending
        if notice_pending:
            notice_pending = False
            try:
                dist.send(_notice(message), peer, group=group, tag=_NOTICE_TAG)
            except Exception:  # noqa: BLE001 - the producer may be gone; the main channel tells the rest
                pass

    device = getattr(curvature, "device", torch.device("cpu"))
    dtype = getattr(curvature, "dtype", None)
    dtype_code = _DTYPES.index(dtype) if dtype in _DTYPES else 255
    failure: BaseException | None = None
    messages = failed_at = 0

    def reply(status: int, value: int = 0, flags: int = 0, tensors=()):
        _send(status, value, flags, list(tensors), peer, group, wire)

    while True:
        try:
            op, a, b, tensors = _recv(peer, group, wire)
        except Exception as err:  # noqa: BLE001 - a dropped connection, a dead producer
            if failure is not None:
                raise PipelineError(f"serve: the update of message {failed_at} failed: {failure}") from failure
            raise PipelineError(f"serve: lost the producer (rank {peer}): {err}") from err
        if op in (UPDATE, UPDATE_MANY, _BATCH):
            for kind, x, y, parts in (_unpack(a, *tensors) if op == _BATCH else [(op, a, b, tensors)]):
                messages += 1
                if failure is None:  # after a failure, keep draining so the producer never blocks
                    try:
                        # what follows the gradient (and the cross term) is captures
                        message = Message.decode([kind, x, y, len(parts) - 1 - y])
                        apply_update(curvature, on_cross, [t.to(device) for t in parts], message)
                    except Exception as err:  # noqa: BLE001 - reported to the producer, then raised here
                        failure, failed_at = err, messages
                        notify(f"the update failed: {type(err).__name__}: {err}")
            continue
        if op == _ABORT:
            notify("")
            if failure is not None:
                raise PipelineError(f"serve: the update of message {failed_at} failed: {failure}") from failure
            raise PipelineError(f"serve: the producer aborted: {_untext(tensors[0])}")
        if failure is not None:
            reply(_ERROR, tensors=[_text(f"the update failed: {type(failure).__name__}: {failure}")])
            continue
        try:
            with torch.no_grad():
                if op == _HELLO:
                    flags = int(on_cross is not None) | int(getattr(curvature, "takes_rows", True)) << 1
                    reply(_OK, int(getattr(curvature, "dim", 0) or 0), flags | (dtype_code << 8))
                elif op == _SOLVE:
                    reply(_OK, tensors=[curvature.solve(tensors[0].to(device))])
                elif op == _RESET:
                    curvature.reset()
                    reply(_OK)
                elif op == _NUM_UPDATES:
                    reply(_OK, int(curvature.num_updates))
                elif op == _INVERSE:
                    reply(_OK, tensors=[curvature.inverse])
                elif op == _CLOSE:
                    notify("")
                    reply(_OK, messages)
                    return {"messages": messages, "num_updates": int(getattr(curvature, "num_updates", messages))}
                else:
                    raise ValueError(f"unknown request {op}")
        except Exception as err:  # noqa: BLE001 - the request fails, the producer is told
            failure = err
            notify(f"{type(err).__name__}: {err}")
            reply(_ERROR, tensors=[_text(f"{type(err).__name__}: {err}")])
