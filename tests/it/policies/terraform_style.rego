# Written the way teams write conftest rules for Terraform plans: resource_changes[_].change.actions.
package main

import rego.v1

deny contains msg if {
	some rc in input.resource_changes
	rc.type == "nimbus_host"
	rc.change.actions[_] == "delete"
	msg := sprintf("%s: releasing a dedicated host needs a person's review", [rc.address])
}

warn contains msg if {
	some rc in input.resource_changes
	rc.change.actions == ["delete", "create"]
	msg := sprintf("%s is replaced", [rc.address])
}
