"""The MD run's safety checks as one-line stop messages: "step N: what happened, naming the atoms".

Every force provider (dpmd.md.provider: checked, sync-free, MPI) finds the same conditions on the device
and reads them when it can -- the checked path at once, sync-free LAG steps later, MPI summed over the
ranks -- then hands what it found to Safety, which raises MDStopError with the message.  So the text of
a stop is the same whichever provider saw it.  Neighbour overflow beyond `sel` is the model's own error
(dpmd.geometry.neighbor.check_sel), wrapped here.

ALARMS names the flags a lagged provider queues: when its alarm is read the checked path reruns on the
current state to name the atoms; should the condition have gone by then, the alarm's name is the message.
"""

from __future__ import annotations

from dpmd.errors import MDStopError

ALARMS = ("lost atoms (non-finite positions)", "atoms closer than min_distance", "non-finite energy",
          "neighbour overflow beyond sel", "stale neighbour list", "an edge outside the compressed model's tables")
SKIN_HINT = "; increase the skin or set sync_free: false"


class Safety:
    """The stop messages of one run: symbols (F lists of N element names) name the atoms."""

    def __init__(self, symbols: list, min_distance: float):
        self.symbols = symbols
        self.min_distance = float(min_distance)

    def atom(self, frame: int, i: int) -> str:
        label = f"atom {i} ({self.symbols[frame][i]})"
        return label if len(self.symbols) == 1 else f"{label} of system {frame}"

    def atoms(self, atoms: list) -> str:
        """The first ten (frame, index) pairs, named."""
        return ", ".join(self.atom(f, i) for f, i in atoms[:10]) + (" ..." if len(atoms) > 10 else "")

    def stop(self, step: int, message: str):
        raise MDStopError(f"step {step}: {message}")

    def lost_atoms(self, step: int, atoms: list, seen: int | None = None):
        """atoms: (frame, index) with non-finite positions; seen: the step of those positions, if earlier."""
        at = "" if seen is None else f" at step {seen}"
        self.stop(step, f"lost atoms (non-finite positions){at}: " + self.atoms(atoms))

    def too_close(self, step: int, pairs: list):
        """pairs: (frame, i, j, distance), each pair once, at most ten."""
        self.stop(step, f"atoms closer than min_distance {self.min_distance} Å: " + ", ".join(
            f"{self.atom(f, i)} and {j} at {d:.3f} Å" for f, i, j, d in pairs[:10]))

    def bad_energy(self, step: int, atoms: list):
        """atoms: (frame, index) whose force or atomic energy is not finite (none: only the total is not)."""
        self.stop(step, "non-finite energy or forces at " + (
            self.atoms(atoms) if atoms else "no single atom (the total is not finite)"))

    def overflow(self, step: int, err: Exception):
        """err: the model's NeighborOverflowError, which names the atom and its counts."""
        self.stop(step, f"neighbour overflow: {err}")

    def alarm(self, step: int, names: list, seen: int):
        """Flags read `lag` steps late whose condition the checked path no longer finds."""
        self.stop(step, f"{', '.join(names)} at step {seen}" + (SKIN_HINT if names == [ALARMS[4]] else ""))

    def skin_too_thin(self, step: int, why: str):
        self.stop(step, why + SKIN_HINT)


def first_seen(err: MDStopError, seen: int) -> MDStopError:
    """The checked path's message for a condition a lagged provider flagged at step `seen`."""
    return MDStopError(f"{err} (first seen at step {seen})")
