{{/* Names, labels and the agent configuration (deeprad.operator.site.config.AgentConfig). */}}

{{- define "deeprad-site.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "deeprad-site.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" -}}
{{- else if contains (include "deeprad-site.name" .) .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "deeprad-site.name" .) | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "deeprad-site.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "deeprad-site.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: deeprad
{{- end -}}

{{- define "deeprad-site.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deeprad-site.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: site-agent
{{- end -}}

{{- define "deeprad-site.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "deeprad-site.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "deeprad-site.site" -}}
{{- .Values.site | default .Release.Name -}}
{{- end -}}

{{- define "deeprad-site.trainingNamespace" -}}
{{- .Values.training.namespace | default .Release.Namespace -}}
{{- end -}}

{{- define "deeprad-site.hubSecretName" -}}
{{- .Values.hub.existingSecret | default (printf "%s-hub-kubeconfig" (include "deeprad-site.fullname" .)) -}}
{{- end -}}

{{- define "deeprad-site.dataClaim" -}}
{{- if .Values.data.existingClaim -}}
{{- .Values.data.existingClaim -}}
{{- else if .Values.data.create -}}
{{- printf "%s-data" (include "deeprad-site.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* repository:tag (tag default: appVersion), or repository[:tag]@digest exactly as given when a
digest pins it. Each part matches deeprad.operator.api.images (values.schema.json). */}}
{{- define "deeprad-site.image" -}}
{{- $i := .image -}}
{{- if $i.digest -}}
{{- $i.repository }}{{ with $i.tag }}:{{ . }}{{ end }}@{{ $i.digest -}}
{{- else -}}
{{- printf "%s:%s" $i.repository ($i.tag | default .appVersion) -}}
{{- end -}}
{{- end -}}

{{/* The agent's config.yaml, in the exact shape of AgentConfig (camelCase keys). */}}
{{- define "deeprad-site.agentConfig" -}}
{{- $t := .Values.training -}}
{{- $gpu := dict "resourceName" $t.gpu.resourceName "count" (int $t.gpu.count) -}}
{{- with $t.gpu.nodeSelector }}{{ $_ := set $gpu "nodeSelector" . }}{{ end -}}
{{- with $t.gpu.tolerations }}{{ $_ := set $gpu "tolerations" . }}{{ end -}}
{{- with $t.gpu.runtimeClassName }}{{ $_ := set $gpu "runtimeClassName" . }}{{ end -}}
{{- $training := dict
      "namespace" (include "deeprad-site.trainingNamespace" .)
      "image" (include "deeprad-site.image" (dict "image" $t.image "appVersion" .Chart.AppVersion))
      "imagePullPolicy" $t.image.pullPolicy
      "identitySecret" $t.identitySecret
      "dataset" $t.dataset
      "gpu" $gpu
      "resources" (dict "cpu" (toString $t.resources.cpu) "memory" (toString $t.resources.memory)) -}}
{{- with (include "deeprad-site.dataClaim" .) }}{{ $_ := set $training "dataClaim" . }}{{ end -}}
{{- with $t.maxTaskDuration }}{{ $_ := set $training "maxTaskDuration" . }}{{ end -}}
{{- with $t.serviceAccount }}{{ $_ := set $training "serviceAccount" . }}{{ end -}}
{{- with $t.localQueue }}{{ $_ := set $training "localQueue" . }}{{ end -}}
{{- with $t.datasetName }}{{ $_ := set $training "datasetName" . }}{{ end -}}
{{- with $t.datasetRecords }}{{ $_ := set $training "datasetRecords" (int .) }}{{ end -}}
{{- $config := dict
      "site" (include "deeprad-site.site" .)
      "heartbeatSeconds" .Values.heartbeatSeconds
      "pollSeconds" .Values.pollSeconds
      "training" $training -}}
{{- with .Values.hubSigningKey }}{{ $_ := set $config "hubSigningKey" . }}{{ end -}}
{{- with (.Values.store | default dict).endpoint }}{{ $_ := set $config "store" (dict "endpoint" .) }}{{ end -}}
{{- $p := .Values.policy | default dict -}}
{{- $policy := dict "requireDifferentialPrivacy" ($p.requireDifferentialPrivacy | default false) "requireSecureAggregation" ($p.requireSecureAggregation | default false) -}}
{{- /* A null `studies` (Helm drops the key) allows no study: the policy fails closed. */ -}}
{{- $_ := set $policy "studies" (ternary $p.studies list (hasKey $p "studies")) -}}
{{- /* Likewise a null or empty `models` allows no model (the default lists the catalogue). */ -}}
{{- $_ := set $policy "models" (ternary $p.models list (hasKey $p "models")) -}}
{{- with $p.maxLocalEpochs }}{{ $_ := set $policy "maxLocalEpochs" (int .) }}{{ end -}}
{{- with $p.maxEpsilonPerStudy }}{{ $_ := set $policy "maxEpsilonPerStudy" . }}{{ end -}}
{{- with $p.maxEpsilonPerDataset }}{{ $_ := set $policy "maxEpsilonPerDataset" . }}{{ end -}}
{{- with $p.delta }}{{ $_ := set $policy "delta" . }}{{ end -}}
{{- with $p.secureAggregationThreatModel }}{{ $_ := set $policy "secureAggregationThreatModel" . }}{{ end -}}
{{- $_ := set $config "policy" $policy -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The restricted Pod Security profile. */}}
{{- define "deeprad-site.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "deeprad-site.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* One NetworkPolicy egress rule: TCP ports to CIDRs. */}}
{{- define "deeprad-site.egressTo" -}}
- to:
    {{- range .cidrs }}
    - ipBlock: {cidr: {{ . }}}
    {{- end }}
  ports:
    {{- range .ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
{{- end -}}
