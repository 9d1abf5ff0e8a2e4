"""Reading the device's results without stalling it: marks in the queued work and values copied to pinned host
memory behind it, waited for by polling an event (the caller queues more work first, and the GIL stays free for
the HTTP server that shares the process)."""

from __future__ import annotations

import time

import torch


class DeviceMark:
    """A point in the work queued so far; `wait()` returns once the device has passed it (without the GIL, as the
    HTTP server shares the process). On the CPU every point is passed at once."""

    def __init__(self, device: torch.device):
        self._event = None
        if device.type == "cuda":  # on the device's own stream: the thread's current device may be another GPU
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        if self._event is not None:
            while not self._event.query():
                time.sleep(0.0002)  # the GIL is free meanwhile, for sure


class Readback:
    """Values copied to the host behind the work queued so far; `tolist()` waits for them. `nearly` (decode chunks)
    marks a point shortly before their end (`slot_decoder.LEAD_STEPS`)."""

    def __init__(self, values: torch.Tensor, nearly: DeviceMark | None = None):
        self.nearly = nearly
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
        else:
            self._host = values.clone()  # the device buffer is reused by the next queued step
        self._done = DeviceMark(values.device)

    def tolist(self) -> list:
        self._done.wait()
        return self._host.tolist()
