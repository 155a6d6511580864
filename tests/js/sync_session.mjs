// Element's SDK (matrix-js-sdk) running its own sync loop against a base URL, for
// tests/test_reverse_proxies.py: the same session directly at the homeserver and through a
// reverse proxy must see the same rooms and events.
//
//   node sync_session.mjs --base-url URL --token TOKEN --user-id @u:hs --device-id DEV
//                         [--syncs N] [--until-body TEXT] [--deadline-ms MS]
//
// The SDK logs to stdout too, so each line of ours starts with "@@ " and then JSON: first
// {"state": "PREPARED"} once the first sync is processed, then, when it stops:
//   {"syncs": n, "errors": [...], "rooms": {room_id: {"membership": "join",
//     "events": [{"event_id", "type", "sender", "state_key", "body"}, ...]}},
//    "peeked": {room_id: [same event shape, ...]}}
// "rooms" is what the SDK made of its syncs; "peeked" the MSC2753 `rooms.peek` sections its
// own sync requests received (the SDK itself ignores that section).
// It stops after N syncs (default 3) and, with --until-body, not before it saw an
// m.room.message with that body; or at the deadline (default 60000 ms). Exit status 0, or 1
// when the deadline passed first.

import { ClientEvent, createClient } from "matrix-js-sdk";

function options(argv) {
    const out = { syncs: 3, deadlineMs: 60000, untilBody: null };
    for (let i = 2; i < argv.length; i += 2) {
        const name = argv[i].replace(/^--/, "").replace(/-(.)/g, (_, c) => c.toUpperCase());
        out[name] = ["syncs", "deadlineMs"].includes(name) ? Number(argv[i + 1]) : argv[i + 1];
    }
    for (const required of ["baseUrl", "token", "userId", "deviceId"]) {
        if (!out[required]) throw new Error(`--${required} is required`);
    }
    return out;
}

function summary(event) {
    return {
        event_id: event.getId(),
        type: event.getType(),
        sender: event.getSender(),
        state_key: event.getStateKey() ?? null,
        body: event.getContent().body ?? null,
    };
}

// The SDK's fetch, watching its /sync answers for `rooms.peek`.
const peeked = {};
async function fetchFn(input, init) {
    const response = await fetch(input, init);
    const url = new URL(typeof input === "string" || input instanceof URL ? input : input.url);
    if (url.pathname.endsWith("/sync") && response.ok) {
        const body = await response.clone().json();
        for (const [roomId, room] of Object.entries(body.rooms?.peek ?? {})) {
            const events = (peeked[roomId] ??= []);
            for (const event of room.timeline?.events ?? []) {
                events.push({
                    event_id: event.event_id,
                    type: event.type,
                    sender: event.sender,
                    state_key: event.state_key ?? null,
                    body: event.content?.body ?? null,
                });
            }
        }
    }
    return response;
}

function seen(client) {
    const rooms = {};
    for (const room of client.getRooms()) {
        rooms[room.roomId] = {
            membership: room.getMyMembership(),
            events: room.getLiveTimeline().getEvents().map(summary),
        };
    }
    return rooms;
}

const opts = options(process.argv);
const client = createClient({
    baseUrl: opts.baseUrl,
    accessToken: opts.token,
    userId: opts.userId,
    deviceId: opts.deviceId,
    fetchFn,
});

function report(value) {
    process.stdout.write("@@ " + JSON.stringify(value) + "\n");
}

let syncs = 0;
let bodySeen = opts.untilBody === null;
const errors = [];

const finished = new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), opts.deadlineMs);
    client.on(ClientEvent.Event, (event) => {
        if (event.getType() === "m.room.message" && event.getContent().body === opts.untilBody) {
            bodySeen = true;
        }
    });
    client.on(ClientEvent.Sync, (state, _previous, data) => {
        if (state === "ERROR") errors.push(String(data?.error?.message ?? data?.error ?? state));
        if (state !== "PREPARED" && state !== "SYNCING") return;
        syncs += 1;
        if (state === "PREPARED") report({ state });
        if (syncs >= opts.syncs && bodySeen) {
            clearTimeout(timer);
            resolve(true);
        }
    });
});

await client.startClient({ initialSyncLimit: 20, lazyLoadMembers: false });
const inTime = await finished;
client.stopClient();
report({ syncs, errors, rooms: seen(client), peeked });
process.exit(inTime ? 0 : 1);
