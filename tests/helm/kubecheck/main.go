// kubecheck reads Kubernetes manifests (YAML documents on stdin) and decodes each one
// strictly into the Kubernetes API's own Go types (k8s.io/api), as the API server does:
// an unknown or misspelt field (names are case-sensitive), a duplicate field, a value
// of the wrong type or an unknown kind is an error naming the document. It is
// the schema check CI can run offline (kubeconform needs schemas from the network).
package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/util/yaml"
	kjson "sigs.k8s.io/json"
	sigsyaml "sigs.k8s.io/yaml"
)

func main() {
	reader := yaml.NewYAMLReader(bufio.NewReader(os.Stdin))
	checked, failed := 0, 0
	for i := 1; ; i++ {
		doc, err := reader.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "document %d: %v\n", i, err)
			os.Exit(2)
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		var meta struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := sigsyaml.Unmarshal(doc, &meta); err != nil {
			fmt.Fprintf(os.Stderr, "document %d: %v\n", i, err)
			failed++
			continue
		}
		if err := check(meta.APIVersion, meta.Kind, doc); err != nil {
			fmt.Fprintf(os.Stderr, "%s %s (document %d): %v\n", meta.Kind, meta.Metadata.Name, i, err)
			failed++
			continue
		}
		fmt.Printf("ok %s/%s %s\n", meta.APIVersion, meta.Kind, meta.Metadata.Name)
		checked++
	}
	if failed > 0 || checked == 0 {
		fmt.Fprintf(os.Stderr, "%d valid, %d invalid\n", checked, failed)
		os.Exit(1)
	}
}

func check(apiVersion, kind string, doc []byte) error {
	var into any
	switch apiVersion + "/" + kind {
	case "v1/Namespace":
		into = &corev1.Namespace{}
	case "v1/ServiceAccount":
		into = &corev1.ServiceAccount{}
	case "v1/ConfigMap":
		into = &corev1.ConfigMap{}
	case "v1/Secret":
		into = &corev1.Secret{}
	case "v1/Service":
		into = &corev1.Service{}
	case "apps/v1/DaemonSet":
		into = &appsv1.DaemonSet{}
	case "apps/v1/Deployment":
		into = &appsv1.Deployment{}
	case "rbac.authorization.k8s.io/v1/ClusterRole":
		into = &rbacv1.ClusterRole{}
	case "rbac.authorization.k8s.io/v1/ClusterRoleBinding":
		into = &rbacv1.ClusterRoleBinding{}
	default:
		return fmt.Errorf("kind %s/%s is not one kubecheck knows", apiVersion, kind)
	}
	// The API server's own strict decoding: field names are case-sensitive, unknown
	// and duplicate fields are errors.
	js, err := sigsyaml.YAMLToJSON(doc)
	if err != nil {
		return err
	}
	strict, err := kjson.UnmarshalStrict(js, into)
	if err != nil {
		return err
	}
	if len(strict) > 0 {
		return fmt.Errorf("%v", strict)
	}
	return nil
}
