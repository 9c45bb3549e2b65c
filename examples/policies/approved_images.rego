# Machines are made or replaced only from approved images.
package nimbus

import rego.v1

approved_images := {"ami-0abc", "ami-0def", "ubuntu-24.04"}

deny contains msg if {
	some rc in input.resource_changes
	rc.type == "nimbus_machine"
	some action in rc.change.actions
	action == "create"
	image := rc.change.after.image
	not approved_images[image]
	msg := sprintf("%s would be made from image %s, which is not approved", [rc.address, image])
}
