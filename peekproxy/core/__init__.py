"""The functional core: Matrix rules and peek logic as pure code.

Everything here takes values and returns values or decisions: typed identifiers, room versions,
canonical JSON, event hashing and redaction, PDU verdicts, X-Matrix headers, the subscription state
machine, failure classification, validation of peek responses, the `/sync` builder and the live
window, history paging (points, tokens, pages) and the DAG order of events, and the rules a
storage implementation calls for its decisions (``stream_rules``: what a room's stream takes in;
``sync_rules``: what a sync snapshot shows), so that every implementation decides alike.

May import: the standard library, pure libraries (signedjson, pynacl, unpaddedbase64, canonical JSON
helpers) and other ``peekproxy.core`` modules. Must not import: ``trio``, ``httpx``, ``sqlite3``,
``psycopg``, the store, the services, the API, the federation shell. An import-linter contract
(``core-is-pure``, run by ``make lint``) keeps it so.
"""
