"""Federation: signing keys, key documents, discovery, X-Matrix, PDU checks."""
