"""The PostgreSQL bucket store: SQL text, connections with reconnect, migrations, the store."""
