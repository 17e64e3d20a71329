//! Who may prompt and who may approve in a channel: user ids, Discord role ids and Slack
//! user groups, as the channel's binding lists them.

use super::{ChannelBinding, Sender};

impl ChannelBinding {
    pub fn may_prompt(&self, who: &Sender) -> bool {
        allowed(&self.prompters, who)
    }
    pub fn may_approve(&self, who: &Sender) -> bool {
        if self.approvers.is_empty() {
            self.may_prompt(who)
        } else {
            allowed(&self.approvers, who)
        }
    }
}

pub(super) fn allowed(list: &[String], who: &Sender) -> bool {
    list.is_empty() || list.iter().any(|id| *id == who.id || who.roles.contains(id))
}
