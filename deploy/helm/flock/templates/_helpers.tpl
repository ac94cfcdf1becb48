{{/* Names and labels shared by every object of the chart. */}}

{{- define "flock.fullname" -}}
{{- printf "%s-agent" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flock.serviceAccountName" -}}
{{- default (include "flock.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "flock.labels" -}}
app.kubernetes.io/name: flock
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* `kubectl -n kube-system get pods -l app=flock-agent` finds the agents (the CNI
plugin's error messages say so). */}}
{{- define "flock.selectorLabels" -}}
app: {{ include "flock.fullname" . }}
{{- end -}}

{{- define "flock.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
