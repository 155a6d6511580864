"""The testbed's data directory: signing keys and saved rooms.

Layout under ``data_dir``: ``rooms/<sha256(room ID)[:32]>.json`` (one saved room each, see
:meth:`TestbedRoom.to_json`), ``remote_keys/<server name>.key`` (the keys of simulated remote
servers); the testbed's own signing key and admin token files are named by the config.
Every problem is a :class:`ServingError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from signedjson.key import read_signing_keys
from signedjson.types import SigningKey

from peekproxy.federation.signing_key import write_new_signing_key
from peekproxy.serving import ServingError
from peekproxy.testbed.rooms import RoomError, TestbedRoom

__all__ = [
    "load_or_create_key",
    "load_or_create_token",
    "load_remote_keys",
    "load_saved_rooms",
    "save_room",
]


def load_or_create_key(path: Path) -> SigningKey:
    """The signing key in ``path``, created when missing (version ``tb_…``).

    Raises:
        ServingError: ``<path>: <problem>`` for a file that holds no usable key.
    """
    if path.exists():
        try:
            with open(path, encoding="utf-8") as stream:
                keys = read_signing_keys(stream)
        except (ValueError, UnicodeDecodeError) as e:
            raise ServingError(f"{path}: not a signing key file: {e}") from None
        if not keys:
            raise ServingError(f"{path}: the signing key file is empty")
        key: SigningKey = keys[0]
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_new_signing_key(path, version_prefix="tb_")


def load_or_create_token(path: Path) -> str:
    """The admin token in ``path``, created when missing (mode 0600).

    Raises:
        ServingError: the file is empty or not text.
    """
    if path.exists():
        try:
            token = path.read_text("utf-8").strip()
        except UnicodeDecodeError:
            raise ServingError(f"{path}: the admin token file is not text") from None
        if not token:
            raise ServingError(f"{path}: the admin token file is empty")
        return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(token + "\n")
    return token


def load_remote_keys(directory: Path) -> dict[str, SigningKey]:
    """Server name → signing key of every ``<server name>.key`` in ``directory``.

    Raises:
        ServingError: as :func:`load_or_create_key`.
    """
    return {file.stem: load_or_create_key(file) for file in sorted(directory.glob("*.key"))}


def load_saved_rooms(
    directory: Path,
    *,
    server_name: str,
    signing_key: SigningKey,
    remote_keys: dict[str, SigningKey],
) -> list[TestbedRoom]:
    """The rooms saved in ``directory`` (none when it is missing), in creation order: the
    create event's ``origin_server_ts``, then the room ID.

    Raises:
        ServingError: ``<file>: <problem>`` for a file that cannot be read, is not JSON,
            fails the room checks (content hashes, signatures by ``signing_key`` or
            ``remote_keys``, the DAG), belongs to another server name, or repeats a room of
            another file.
    """
    if not directory.is_dir():
        return []
    loaded: dict[str, tuple[TestbedRoom, Path]] = {}
    for file in sorted(directory.glob("*.json")):
        room = _load_room(file, server_name, signing_key, remote_keys)
        if room.room_id in loaded:
            raise ServingError(
                f"{file}: room {room.room_id} is also saved in {loaded[room.room_id][1]}"
            )
        loaded[room.room_id] = (room, file)

    def created(room: TestbedRoom) -> tuple[int, str]:
        ts = room.events[0].get("origin_server_ts")
        return (ts if isinstance(ts, int) else 0, room.room_id)

    return sorted((room for room, _ in loaded.values()), key=created)


def _load_room(
    file: Path, server_name: str, signing_key: SigningKey, remote_keys: dict[str, SigningKey]
) -> TestbedRoom:
    try:
        text = file.read_text("utf-8")
    except UnicodeDecodeError:
        raise ServingError(f"{file}: not a saved room (not UTF-8 text)") from None
    except OSError as e:
        raise ServingError(f"{file}: cannot read it: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ServingError(f"{file}: not valid JSON (truncated?): {e}") from None
    try:
        return TestbedRoom.from_json(
            data, server_name=server_name, signing_key=signing_key, remote_keys=remote_keys
        )
    except RoomError as e:
        raise ServingError(f"{file}: {e}") from None


def save_room(directory: Path, room: TestbedRoom) -> None:
    """Write ``room`` to its file in ``directory`` (made when missing), atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(room.room_id.encode()).hexdigest()[:32]
    target = directory / f"{name}.json"
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(room.to_json(), ensure_ascii=False))
    os.replace(temporary, target)
