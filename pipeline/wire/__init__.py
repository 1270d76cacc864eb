"""The wire: msgpack messages (``messages``) and the Redis Streams they travel on (``streams``)."""
