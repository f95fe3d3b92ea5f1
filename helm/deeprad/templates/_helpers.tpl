{{/* Names, labels and the few values several templates derive. */}}

{{- define "deeprad.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "deeprad.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" -}}
{{- else if contains (include "deeprad.name" .) .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "deeprad.name" .) | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "deeprad.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "deeprad.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: deeprad
{{- end -}}

{{- define "deeprad.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deeprad.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "deeprad.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "deeprad.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag (tag default: appVersion), or repository[:tag]@digest exactly as given when a
digest pins it. Each part matches deeprad.operator.api.images (values.schema.json). */}}
{{- define "deeprad.image" -}}
{{- $i := .image -}}
{{- if $i.digest -}}
{{- $i.repository }}{{ with $i.tag }}:{{ . }}{{ end }}@{{ $i.digest -}}
{{- else -}}
{{- printf "%s:%s" $i.repository ($i.tag | default .appVersion) -}}
{{- end -}}
{{- end -}}

{{- define "deeprad.operatorImage" -}}
{{- include "deeprad.image" (dict "image" .Values.operator.image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{- define "deeprad.aggregatorImage" -}}
{{- include "deeprad.image" (dict "image" .Values.aggregator.image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{/* s3://BUCKET[/PREFIX]?endpoint=HOST:PORT&secure=BOOL, as deeprad.core.store parses it. */}}
{{- define "deeprad.storeUrl" -}}
{{- $s := .Values.store -}}
{{- printf "s3://%s%s?endpoint=%s&secure=%t" $s.bucket (ternary (printf "/%s" (trimAll "/" $s.prefix)) "" (ne $s.prefix "")) $s.endpoint $s.secure -}}
{{- end -}}

{{- define "deeprad.storePort" -}}
{{- $parts := splitList ":" .Values.store.endpoint -}}
{{- if gt (len $parts) 1 -}}{{ last $parts }}{{- else -}}{{ ternary 443 80 .Values.store.secure }}{{- end -}}
{{- end -}}

{{- define "deeprad.storeSecretName" -}}
{{- .Values.store.credentials.existingSecret | default (printf "%s-store" (include "deeprad.fullname" .)) -}}
{{- end -}}

{{- define "deeprad.hubKeysName" -}}
{{- printf "%s-hub-keys" (include "deeprad.fullname" .) -}}
{{- end -}}

{{/* The restricted Pod Security profile, for every pod and container of the chart. */}}
{{- define "deeprad.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "deeprad.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
