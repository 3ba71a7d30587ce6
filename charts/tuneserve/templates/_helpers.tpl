{{- define "tuneserve.name" -}}{{ .Release.Name }}-operator{{- end -}}
{{- define "tuneserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.name }}{{ .Values.serviceAccount.name }}{{ else }}{{ include "tuneserve.name" . }}{{ end -}}
{{- end -}}
{{- define "tuneserve.labels" -}}
app.kubernetes.io/name: tuneserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
