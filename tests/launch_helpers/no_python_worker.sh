#!/bin/sh
# Executable worker for --no_python: records its rank and arguments.
printf '%s\n' "$RANK" "$@" > "$OUT_DIR/np-$RANK.txt"
