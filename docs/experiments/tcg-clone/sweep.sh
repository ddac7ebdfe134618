#!/bin/bash
# each line: MACHINE|CPU|APPEND|EXTRA
cd "${D:-/tmp/tcgclone}"
while IFS='|' read -r M C A E; do
  [ -z "$M" ] && continue
  out=$(MACHINE=$M CPU=$C APPEND="$A" EXTRA="$E" NCLONES=${NCL:-2} OBS=6 timeout 300 python3 tmpl.py 2>&1)
  cs=$(echo "$out" | grep -o 'template clocksource: .*')
  res=$(echo "$out" | grep -E '^clone[0-9]' | grep -o 'ticks in.*' | sed 's/echo=/e=/' | tr '\n' ';')
  fin=$(echo "$out" | tail -1)
  echo "$M | $C | $A | $E || $cs || $res || $fin"
  echo "$out" | grep -iE 'error|Traceback|assert' | head -3
done
