"""The command line, above every layer (docs/architecture.md#layers-and-the-dependency-rule):
`cli` (the parser; imports each component inside its command function), `common` (exit
codes, the spec), `commands` and `admin` (store-facing commands), `materialize`, and
`supervisor` <- `stack` (the processes of `nextbest up`, then their order)."""
