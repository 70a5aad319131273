"""One controller per domain; each route names the API-key scope it needs in `opt`."""
