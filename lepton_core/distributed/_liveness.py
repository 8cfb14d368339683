"""Which rank is missing when a torch.distributed collective of a group fails (the torch and
hierarchical transports; the shared-memory transport watches its peers natively, transport.h).

Gloo and NCCL report a failed collective (a timeout, a closed connection) without saying which rank
is to blame, and on another host there is no process to look at. So every rank of such a group
keeps a heartbeat in the group's store: a background thread writes "<beats> <calls> <failed>"
under hb/<rank> every PERIOD_S seconds, where <calls> counts the calls this rank has started and
<failed> is the call it saw fail (-1). On a failure, a rank posts its own state at once, reads
everyone's, waits a few periods and reads again:
  1. a rank whose heartbeat stopped meanwhile, and that had not reported a failure itself, is
     missing: it was killed, froze (SIGSTOP, a debugger) or lost its host;
  2. otherwise, a rank that has not started the failed call did not take part in it (it stopped
     calling, or is stuck elsewhere).
A store that cannot be read names nobody (the error then says so).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, List, Optional, Tuple

PERIOD_S = 1.0
WAIT_PERIODS = 2.5  # how long a diagnosis watches the heartbeats: over two beats of a live rank


class Heartbeat:
    """This rank's heartbeat in `store` (a PrefixStore of the group's store), and the diagnosis."""

    def __init__(self, store, rank: int, size: int, on_beat: Optional[Callable[[], None]] = None):
        """on_beat: also called on every beat (the hierarchical path tells its host's ranks that this
        rank is alive while it is inside a collective between hosts: ShmComm.keep_alive)."""
        self._store, self.rank, self.size, self._on_beat = store, rank, size, on_beat
        self._lock = threading.Lock()
        self._beats = 0
        self.calls = 0    # calls started (the communicator counts them)
        self._failed = -1
        self._stop = threading.Event()
        self._post()      # the key exists before any collective of the group can fail
        self._thread = threading.Thread(target=self._run, name="lepton-heartbeat", daemon=True)
        self._thread.start()

    def _post(self) -> None:
        with self._lock:
            self._beats += 1
            self._store.set(f"hb/{self.rank}", f"{self._beats} {self.calls} {self._failed}")
        if self._on_beat is not None:
            self._on_beat()

    def _run(self) -> None:
        while not self._stop.wait(PERIOD_S):
            try:
                self._post()
            except Exception:  # noqa: BLE001 - the store went away (the job is ending): stop beating
                return

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * PERIOD_S)

    def _read(self) -> List[Optional[Tuple[int, int, int]]]:
        """Every rank's (beats, calls, failed); None where it cannot be read."""
        out: List[Optional[Tuple[int, int, int]]] = []
        for r in range(self.size):
            key = f"hb/{r}"
            try:
                if not self._store.check([key]):
                    out.append(None)
                    continue
                beats, calls, failed = (int(v) for v in self._store.get(key).decode().split())
                out.append((beats, calls, failed))
            except Exception:  # noqa: BLE001 - a store error: unknown
                out.append(None)
        return out

    def report_failure(self) -> None:
        """Tells the others that this rank saw the current call fail (it is not to blame)."""
        self._failed = self.calls
        try:
            self._post()
        except Exception:  # noqa: BLE001 - the store is gone: nothing to tell
            pass

    def missing(self) -> Tuple[List[int], str]:
        """After the current call (number self.calls) failed: (group ranks, what they did) of the
        ranks to blame, or ([], why nobody can be named). Takes WAIT_PERIODS heartbeat periods."""
        call = self.calls
        self.report_failure()
        before = self._read()
        time.sleep(WAIT_PERIODS * PERIOD_S)
        after = self._read()
        if after[self.rank] is None:
            return [], "the group's store cannot be reached"
        others = [r for r in range(self.size) if r != self.rank]
        stopped = [r for r in others
                   if after[r] is None or (before[r] is not None and after[r][0] == before[r][0] and after[r][2] < 0)]
        if stopped:
            return stopped, (f"stopped responding during call {call - 1} (no heartbeat for "
                             f"{WAIT_PERIODS * PERIOD_S:g} s: killed, frozen or cut off)")
        absent = [r for r in others if after[r][1] < call]
        if absent:
            return absent, f"did not take part in call {call - 1}"
        return [], f"every rank is alive and took part in call {call - 1}"
