"""The lifecycle rules under random sequences of events (Hypothesis stateful testing).

A small pure model of the whole loop drives server/lifecycle.py: the server side changes a
command's state only through `lifecycle.next_state` (as the store does through `sources()` and
`GUARDS`), the agent side keeps a run record as agent/state.py does (a command id is recorded
before it runs, and never runs again), and streams, acks and completions can be lost, repeated,
reordered against sweeps and clock advances. After every step the invariants must hold:
one state per command, terminal states absorbing, one owner per command and one busy command
per agent, no agent running a command twice, a repeated message changing nothing, and no
command both expired and run.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from server.lifecycle import (
    BUSY,
    TERMINAL,
    CommandState,
    Event,
    RequestState,
    completion_event,
    next_state,
    request_state,
)

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "pulse-unit-hypothesis")

S = CommandState
AGENTS = ("a1", "a2", "a3")
HOST_OF = {"a1": "h1", "a2": "h2", "a3": "h2"}  # a2 and a3 share a host: either may claim
DURATION = 3
GRACE = 2
ACK_TIMEOUT = 2
OUTCOMES = ("succeeded", "failed", "cancelled")


@dataclass
class Command:
    host: str
    expires_at: int
    state: CommandState = S.PENDING
    owner: str | None = None
    attempts: int = 0
    sent_at: int = 0
    deadline: int | None = None
    history: list[CommandState] = field(default_factory=lambda: [S.PENDING])


@dataclass
class Agent:
    name: str
    session: int | None = None
    started: set[int] = field(default_factory=set)  # the durable run record (agent/state.py)
    inbox: list[tuple[int, int]] = field(default_factory=list)  # (session, command) on the wire
    acks: list[tuple[int, int]] = field(default_factory=list)  # (session, command) to send
    running: list[int] = field(default_factory=list)  # executions in progress
    reports: list[tuple[int, str]] = field(default_factory=list)  # completions to report


class PulseModel(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.now = 0
        self.sessions = 0
        self.commands: list[Command] = []
        self.agents = {name: Agent(name) for name in AGENTS}
        self.executions: dict[tuple[str, int], int] = {}
        self.messages: list[tuple[str, str, int, str]] = []  # (kind, agent, command, detail)

    # --- the server: every state change goes through lifecycle.next_state ------------------

    def apply(self, command_id: int, event: Event) -> bool:
        command = self.commands[command_id]
        new = next_state(command.state, event, delivered=command.attempts > 0)
        if new is None:
            return False
        assert command.state not in TERMINAL, (command.state, event)
        command.state = new
        command.history.append(new)
        return True

    def server_ack(self, agent: str, command_id: int, accepted: bool) -> None:
        command = self.commands[command_id]
        if command.owner != agent:
            return  # PERMISSION_DENIED in the store
        event = Event.ACK_ACCEPTED if accepted else Event.ACK_REJECTED
        if self.apply(command_id, event) and accepted:
            command.deadline = self.now + DURATION + GRACE

    def server_complete(self, agent: str, command_id: int, outcome: str) -> None:
        command = self.commands[command_id]
        if command.owner != agent:
            return
        was = command.state
        recorded = self.apply(command_id, completion_event(outcome))
        # Nothing accepted is lost: the owner's outcome counts unless the command already ended.
        assert recorded or was in TERMINAL, (was, outcome, command.history)

    def lose_stream(self, agent: Agent) -> None:
        """The server notices the stream is gone: what was sent on it and unacknowledged is
        queued again; what is on the wire in either direction is lost."""
        for command_id, command in enumerate(self.commands):
            if command.owner == agent.name:
                self.apply(command_id, Event.STREAM_LOST)
        agent.session = None
        agent.inbox.clear()
        agent.acks.clear()

    # --- rules ------------------------------------------------------------------------------

    @rule(host=st.sampled_from(["h1", "h2"]), ttl=st.integers(1, 12))
    def submit(self, host: str, ttl: int) -> None:
        self.commands.append(Command(host=host, expires_at=self.now + ttl))

    @rule(name=st.sampled_from(AGENTS))
    def connect(self, name: str) -> None:
        agent = self.agents[name]
        if agent.session is not None:
            self.lose_stream(agent)  # a newer session supersedes the old one
        self.sessions += 1
        agent.session = self.sessions

    @rule(name=st.sampled_from(AGENTS))
    def disconnect(self, name: str) -> None:
        if self.agents[name].session is not None:
            self.lose_stream(self.agents[name])

    @rule(name=st.sampled_from(AGENTS), data=st.data())
    def dispatch(self, name: str, data: st.DataObject) -> None:
        claimable = self.claimable(name)
        if claimable:
            self.send(name, data.draw(st.sampled_from(claimable)))

    def claimable(self, name: str) -> list[int]:
        """The dispatcher's claim: one command at a time per agent, never past its TTL."""
        if self.agents[name].session is None:
            return []
        if any(c.owner == name and c.state in BUSY for c in self.commands):
            return []
        return [
            i
            for i, c in enumerate(self.commands)
            if c.state == S.PENDING
            and c.expires_at > self.now
            and (c.owner == name or (c.owner is None and c.host == HOST_OF[name]))
        ]

    def send(self, name: str, command_id: int) -> None:
        agent = self.agents[name]
        assert agent.session is not None
        command = self.commands[command_id]
        assert self.apply(command_id, Event.DISPATCH)
        command.owner = name
        command.attempts += 1
        command.sent_at = self.now
        agent.inbox.append((agent.session, command_id))

    @rule(name=st.sampled_from(AGENTS))
    def agent_receives(self, name: str) -> None:
        """The agent admits a pushed command: runs it unless its run record has it; acks."""
        agent = self.agents[name]
        if not agent.inbox:
            return
        session, command_id = agent.inbox.pop(0)
        if command_id not in agent.started:
            agent.started.add(command_id)
            key = (name, command_id)
            self.executions[key] = self.executions.get(key, 0) + 1
            agent.running.append(command_id)
        agent.acks.append((session, command_id))

    @rule(name=st.sampled_from(AGENTS), lose=st.booleans())
    def ack_arrives(self, name: str, lose: bool) -> None:
        agent = self.agents[name]
        if not agent.acks:
            return
        session, command_id = agent.acks.pop(0)
        if lose or session != agent.session:
            return
        self.server_ack(name, command_id, True)
        self.messages.append(("ack", name, command_id, ""))

    @rule(name=st.sampled_from(AGENTS), outcome=st.sampled_from(OUTCOMES))
    def agent_finishes(self, name: str, outcome: str) -> None:
        agent = self.agents[name]
        if agent.running:
            agent.reports.append((agent.running.pop(0), outcome))

    @rule(name=st.sampled_from(AGENTS))
    def completion_arrives(self, name: str) -> None:
        """Completions are unary RPCs retried until answered: they need no stream."""
        agent = self.agents[name]
        if agent.reports:
            command_id, outcome = agent.reports.pop(0)
            self.server_complete(name, command_id, outcome)
            self.messages.append(("complete", name, command_id, outcome))

    @rule(name=st.sampled_from(AGENTS))
    def agent_crashes(self, name: str) -> None:
        """Killed: the stream and executions in progress die; the run record and the
        completions already written survive (agent/state.py)."""
        agent = self.agents[name]
        if agent.session is not None:
            self.lose_stream(agent)
        agent.running.clear()

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if self.commands:
            self.apply(data.draw(st.integers(0, len(self.commands) - 1)), Event.CANCEL)

    @rule(seconds=st.integers(1, 6))
    def clock_advances(self, seconds: int) -> None:
        self.now += seconds

    @rule()
    def sweep(self) -> None:
        """The periodic sweep's clocks (db/store.py); which events apply is lifecycle's call."""
        for command_id, c in enumerate(self.commands):
            if c.state == S.SENT and self.now >= c.sent_at + ACK_TIMEOUT:
                self.apply(command_id, Event.STREAM_LOST)  # re-queued: the ack never came
            if (
                c.state == S.PENDING
                and self.now >= c.expires_at
                and not self.apply(command_id, Event.EXPIRE)  # only if never delivered
                and self.now >= c.sent_at + DURATION + GRACE
            ):
                self.apply(command_id, Event.TIME_OUT)
            if c.state == S.RUNNING and c.deadline is not None and self.now >= c.deadline:
                self.apply(command_id, Event.TIME_OUT)

    @precondition(lambda self: bool(self.messages))
    @rule(data=st.data())
    def duplicate_message(self, data: st.DataObject) -> None:
        """Any message delivered again, twice in a row: the second copy changes nothing."""
        kind, name, command_id, detail = data.draw(st.sampled_from(self.messages))
        deliver = (
            (lambda: self.server_ack(name, command_id, True))
            if kind == "ack"
            else (lambda: self.server_complete(name, command_id, detail))
        )
        deliver()
        before = [(c.state, c.owner, c.deadline) for c in self.commands]
        deliver()
        assert [(c.state, c.owner, c.deadline) for c in self.commands] == before

    def teardown(self) -> None:
        """Whatever happened, once the faults stop every command reaches a terminal state."""
        if not hasattr(self, "commands"):
            return
        for _ in range(40):
            for name, agent in self.agents.items():
                if agent.session is None:
                    self.connect(name)
                if claimable := self.claimable(name):
                    self.send(name, claimable[0])
                while agent.inbox:
                    self.agent_receives(name)
                while agent.acks:
                    self.ack_arrives(name, lose=False)
                while agent.running:
                    self.agent_finishes(name, "succeeded")
                while agent.reports:
                    self.completion_arrives(name)
            self.clock_advances(1)
            self.sweep()
        stuck = [c for c in self.commands if c.state not in TERMINAL]
        assert not stuck, stuck
        self.no_agent_runs_a_command_twice()
        self.nothing_both_expired_and_run()

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def one_state_per_command_and_terminal_states_absorb(self) -> None:
        for c in getattr(self, "commands", []):
            assert isinstance(c.state, CommandState)
            first_terminal = next((i for i, s in enumerate(c.history) if s in TERMINAL), None)
            if first_terminal is not None:
                assert c.history[first_terminal:] == [c.history[first_terminal]], c.history

    @invariant()
    def one_owner_and_one_busy_command_per_agent(self) -> None:
        for name in AGENTS if hasattr(self, "commands") else ():
            busy = [c for c in self.commands if c.owner == name and c.state in BUSY]
            assert len(busy) <= 1, busy
        for (name, command_id), _ in getattr(self, "executions", {}).items():
            assert self.commands[command_id].owner == name  # only its owner ever ran it

    @invariant()
    def no_agent_runs_a_command_twice(self) -> None:
        for key, count in getattr(self, "executions", {}).items():
            assert count == 1, key

    @invariant()
    def nothing_both_expired_and_run(self) -> None:
        for command_id, c in enumerate(getattr(self, "commands", [])):
            ran = any(cid == command_id for _, cid in self.executions)
            if c.state == S.EXPIRED:
                assert not ran and c.attempts == 0, c
            if c.state in (S.SUCCEEDED, S.FAILED):
                assert ran, c  # an outcome is only ever reported by a run

    @invariant()
    def request_state_agrees(self) -> None:
        commands = getattr(self, "commands", [])
        if not commands:
            return
        counts: dict[CommandState, int] = {}
        for c in commands:
            counts[c.state] = counts.get(c.state, 0) + 1
        derived = request_state(counts, cancelled=False)
        if all(c.state in TERMINAL for c in commands):
            assert derived not in (RequestState.PENDING, RequestState.RUNNING)
        else:
            assert derived in (RequestState.PENDING, RequestState.RUNNING)


PulseModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lifecycle_under_random_event_sequences = PulseModel.TestCase
