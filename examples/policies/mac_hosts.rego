# At most 4 new Mac hosts per plan: each commits 24 host-hours.
package nimbus

import rego.v1

max_new_mac_hosts := 4

new_mac_hosts := [a |
	some a in input.actions
	a.type == "allocate_host"
	startswith(a.instance_type, "mac")
]

deny contains msg if {
	count(new_mac_hosts) > max_new_mac_hosts
	msg := sprintf("the plan allocates %d Mac hosts; at most %d may be allocated by one plan", [count(new_mac_hosts), max_new_mac_hosts])
}
