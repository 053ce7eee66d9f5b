{{- define "sonde.labels" -}}
app.kubernetes.io/name: sonde
{{- end -}}

{{/* The capabilities the agent adds back after dropping ALL (README, "Security"). */}}
{{- define "sonde.capabilities" -}}
{{- $caps := list "BPF" "PERFMON" -}}
{{- if .Values.tlsCapture }}{{ $caps = append $caps "SYS_ADMIN" }}{{ end -}}
{{- $caps = concat $caps (list "SYS_PTRACE" "DAC_READ_SEARCH") -}}
{{- if .Values.traceparentInjection }}{{ $caps = append $caps "NET_ADMIN" }}{{ end -}}
[{{ join ", " $caps }}]
{{- end -}}
