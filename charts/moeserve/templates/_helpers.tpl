{{- define "moeserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "moeserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "moeserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "moeserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moeserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "moeserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Least privilege: what the operator renders, plus what the router's Role grants
     (RBAC forbids granting verbs one does not hold). */}}
{{- define "moeserve.rules" -}}
# Exactly the calls the operator makes (tests/operator/test_operator_rbac.py derives them from
# the code and a recorded emulator run): server-side apply (create + patch), pruning (list +
# delete), kopf's watches, status patches, events; the router Role it renders (no escalation)
# and blockOwnerDeletion on its children (moedeployments/finalizers).
- apiGroups: [""]
  resources: [configmaps, serviceaccounts]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# The worker-plane tokens: one Secret per deployment and generation, created (never read: no
# get, list or watch, so no other Secret's content is reachable) and deleted after a rotation.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list, create, patch, delete]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
- apiGroups: [leaderworkerset.x-k8s.io]
  resources: [leaderworkersets]
  verbs: [get, list, create, patch, delete]
- apiGroups: [moeserve.io]
  resources: [moedeployments]
  verbs: [get, list, watch, patch]
- apiGroups: [moeserve.io]
  resources: [moedeployments/finalizers]
  verbs: [update]
- apiGroups: [moeserve.io]
  resources: [moedeployments/status, moeworkerpools/scale, moeworkerpools/status]
  verbs: [patch]
- apiGroups: [moeserve.io]
  resources: [moeworkerpools]
  verbs: [get, list, watch, create, patch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [rolebindings, roles]
  verbs: [create, patch]
- apiGroups: [scheduling.volcano.sh]
  resources: [podgroups]
  verbs: [get, list, create, patch, delete]
- apiGroups: [scheduling.x-k8s.io]
  resources: [podgroups]
  verbs: [get, list, create, patch, delete]
{{- end -}}
