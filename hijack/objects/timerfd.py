"""timerfds: made anew by the restorer on their clock, armed for the time they had left,
with the expirations the program had not read yet (TFD_IOC_SET_TICKS), and given."""

from __future__ import annotations

from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import O_NONBLOCK, DumpContext, Kind, RestoreContext
from hijack.sys import notify, procfs


class Timerfd(Kind):
    name = "timerfd"
    record_types = (rec.TimerfdObject,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.TIMERFD

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        state = notify.timerfd_state(info)

        def make(id: int) -> rec.TimerfdObject:
            return rec.TimerfdObject(
                id=id,
                clock_id=state.clock_id,
                settime_flags=state.settime_flags,
                ticks=state.ticks,
                value_ns=state.value_ns,
                interval_ns=state.interval_ns,
            )

        # Every timerfd shares one anonymous inode: the description is the timer.
        return dump.add_object(("timerfd", dump.descriptions[entry.fd]), make)

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        timer = restore.image.object_of(descriptor, rec.TimerfdObject)
        state = notify.TimerfdState(
            timer.clock_id, timer.settime_flags, timer.ticks, timer.value_ns, timer.interval_ns
        )
        made = notify.make_timerfd(state, descriptor.flags & O_NONBLOCK)
        restore.give_made(made, descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        timer = image.object_of(descriptor, rec.TimerfdObject)
        armed = (
            f"next in {timer.value_ns / 1e6:g} ms, every {timer.interval_ns / 1e6:g} ms"
            if timer.value_ns
            else "disarmed"
        )
        return f"clock {timer.clock_id}, {armed}, {timer.ticks} unread ticks"
